# Two commands a user needs: `make up` (run the platform) and `make test` (pass the tests).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup nft console-assets browser tools manifests up down status test test-unit test-k8s lint bench clean
TOOLS  := .stoker/tools
# helm's own state kept with the tools, so that a user's helm plugins and settings change no render
HELM   := HELM_CACHE_HOME=$(TOOLS)/helm-home/cache HELM_CONFIG_HOME=$(TOOLS)/helm-home/config \
          HELM_DATA_HOME=$(TOOLS)/helm-home/data $(TOOLS)/bin/helm

setup: $(STAMP) nft console-assets ## create the venv, install Stoker, fetch the Kafka jars (idempotent)
	@$(BIN)/stoker setup

# The web console's browser libraries (Chart.js, Cytoscape.js), pinned by package-lock.json and served
# from node_modules as published: no bundle, nothing built is committed.
CONSOLE_WEB := services/console/web
console-assets: $(CONSOLE_WEB)/node_modules/.package-lock.json
$(CONSOLE_WEB)/node_modules/.package-lock.json: $(CONSOLE_WEB)/package.json $(CONSOLE_WEB)/package-lock.json
	@command -v npm >/dev/null || { echo "need npm (Node.js) for the web console's libraries"; exit 1; }
	@cd $(CONSOLE_WEB) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# Debian's chromium and chromium-driver: the console's tests drive a real headless browser.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { test "$$(id -u)" -eq 0 \
		&& { apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
		     || { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }; } \
		|| { echo "need chromium and chromium-driver (apt-get install chromium chromium-driver) for the console tests"; exit 1; }; }

# `nft` (Debian's nftables) for --network egress: a root agent confines egress instances with it.
nft:
	@command -v nft >/dev/null || test "$$(id -u)" -ne 0 || apt-get install -y -q nftables >/dev/null 2>&1 \
		|| { apt-get update -q >/dev/null && apt-get install -y -q nftables >/dev/null; } \
		|| echo "could not install nftables: functions with --network egress will be refused"

# helm, etcd, kube-apiserver, kubectl (the chart's renderer, the k8s tier's control plane) in
# $(TOOLS)/bin: those on PATH are used as they are, the others built with Go once and reused.
tools:
	@bash deploy/tools/install.sh $(TOOLS)

manifests: tools ## deploy/k8s/stoker.yaml = `helm template` of the chart (commit both)
	$(HELM) template stoker deploy/helm/stoker --namespace stoker > deploy/k8s/stoker.yaml.new
	mv deploy/k8s/stoker.yaml.new deploy/k8s/stoker.yaml
	$(HELM) lint --strict deploy/helm/stoker

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	@command -v java >/dev/null || { echo "need java 17 (openjdk-17-jre-headless) for the embedded Kafka"; exit 1; }
	@command -v mvn >/dev/null || { echo "need maven to fetch the Kafka jars from Maven Central"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

up: setup ## run the embedded platform in the foreground (Ctrl-C stops it)
	$(BIN)/stoker up

down: ## stop a detached platform
	@test -x $(BIN)/stoker && $(BIN)/stoker down || true

status:
	$(BIN)/stoker status

test: setup tools browser ## run the whole suite against a broker and a Kubernetes API server the tests start and stop
	$(BIN)/pytest -q tests

test-unit: setup
	$(BIN)/pytest -q tests/unit

test-k8s: setup tools ## the chart through helm, and etcd + kube-apiserver: manifests, RBAC, nodewatch
	$(BIN)/pytest -q tests/k8s

lint: setup
	$(BIN)/ruff check events services loadtest tests
	$(BIN)/mypy

bench: setup ## warm/cold latency vs. a bare Kafka round trip (see loadtest/README.md)
	$(BIN)/python -m loadtest.spine

clean: down
	rm -rf $(VENV) .stoker
