# Two commands a user needs: `make up` (run the platform) and `make test` (pass the tests).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup nft up down status test test-unit lint bench clean

setup: $(STAMP) nft ## create the venv, install Stoker, fetch the Kafka jars (idempotent)
	@$(BIN)/stoker setup

# `nft` (Debian's nftables) for --network egress: a root agent confines egress instances with it.
nft:
	@command -v nft >/dev/null || test "$$(id -u)" -ne 0 || apt-get install -y -q nftables >/dev/null 2>&1 \
		|| { apt-get update -q >/dev/null && apt-get install -y -q nftables >/dev/null; } \
		|| echo "could not install nftables: functions with --network egress will be refused"

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

test: setup ## run the whole suite against a broker the tests start and stop
	$(BIN)/pytest -q tests

test-unit: setup
	$(BIN)/pytest -q tests/unit

lint: setup
	$(BIN)/ruff check events services loadtest tests
	$(BIN)/mypy

bench: setup ## warm/cold latency vs. a bare Kafka round trip (see loadtest/README.md)
	$(BIN)/python -m loadtest.spine

clean: down
	rm -rf $(VENV) .stoker
