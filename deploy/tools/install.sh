#!/usr/bin/env bash
# The Kubernetes tools Stoker's chart and its k8s tests need: helm, etcd, kube-apiserver, kubectl.
#
#   deploy/tools/install.sh [TOOLS_DIR]      (default .stoker/tools; `make tools` runs it)
#
# Each tool ends up as TOOLS_DIR/bin/<tool>. One already on PATH is used as it is (a link to it);
# otherwise it is built from source with Go (`nice`d: the machine stays usable), once: the binary
# stays in TOOLS_DIR, and a fresh clone on the same machine relinks from Go's own caches in a
# fraction of the first build's time. Running it again is a no-op. Versions are pinned here and
# in the go.mod/go.sum beside this script.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
tools="${1:-${STOKER_TOOLS:-.stoker/tools}}"
mkdir -p "$tools/bin"
tools="$(cd "$tools" && pwd)"
bin="$tools/bin"

HELM_VERSION=v3.22.0
KUBE_VERSION=v1.37.2   # kube-apiserver and kubectl: deploy/tools/kubernetes/go.mod
ETCD_VERSION=v3.7.3    # deploy/tools/etcd/go.mod

# A tool found on PATH, outside our own bin folder, or nothing.
on_path() {
    local found
    found="$(PATH="$(printf %s "$PATH" | tr : '\n' | grep -vxF "$bin" | paste -sd:)" command -v "$1" || true)"
    printf %s "$found"
}

# The stamp that says TOOLS_DIR/bin/<tool> is the pinned version we built (or the PATH one we linked).
stamp() { printf %s "$tools/$1.version"; }
current() { [ -x "$bin/$1" ] && [ -f "$(stamp "$1")" ] && [ "$(cat "$(stamp "$1")")" = "$2" ]; }

# Go's own installer puts it in /usr/local/go, which a non-login shell may not have on PATH.
if ! command -v go >/dev/null && [ -x /usr/local/go/bin/go ]; then
    PATH="$PATH:/usr/local/go/bin"
fi

need_go() {
    if ! command -v go >/dev/null; then
        cat >&2 <<EOF
deploy/tools/install.sh: $* not found on PATH, and no Go to build it with.
Install Go 1.26 or newer (then \`make tools\` builds them once, about 20 minutes on 2 cores), or put
helm $HELM_VERSION, etcd $ETCD_VERSION, kube-apiserver and kubectl $KUBE_VERSION on PATH.
EOF
        exit 1
    fi
    local have
    have="$(go env GOVERSION)"
    if ! printf '%s\n' go1.26 "$have" | sort -V -C; then
        echo "deploy/tools/install.sh: Go $have is too old to build $*: install Go 1.26 or newer" >&2
        exit 1
    fi
}

# Go builds: our go.mod/go.sum verbatim (-mod=readonly), no toolchain download, at low priority.
gobuild() {
    GOTOOLCHAIN=local GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0 nice -n 15 go "$@"
}

link_or_mark() {  # tool version -> 0 when done (linked from PATH), 1 when it must be built
    local tool="$1" version="$2" found
    current "$tool" "$version" && return 0
    found="$(on_path "$tool")"
    if [ -n "$found" ]; then
        if [ "$(readlink "$bin/$tool" || true)" != "$found" ]; then
            ln -sfn "$found" "$bin/$tool"
            echo "tools: $tool from PATH ($found), not built"
        fi
        printf 'PATH' >"$(stamp "$tool")"
        return 0
    fi
    return 1
}

started=$SECONDS
scratch=""
trap '[ -z "$scratch" ] || rm -rf "$scratch"' EXIT  # an interrupted build leaves no half-made folder

if ! link_or_mark helm "$HELM_VERSION"; then
    need_go helm
    echo "tools: building helm $HELM_VERSION (a few minutes, once)"
    scratch="$(mktemp -d "$tools/build.XXXXXX")"
    GOBIN="$scratch" gobuild install -trimpath \
        -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
    mv -f "$scratch/helm" "$bin/helm"
    rm -rf "$scratch"; scratch=""
    printf %s "$HELM_VERSION" >"$(stamp helm)"
fi

if ! link_or_mark etcd "$ETCD_VERSION"; then
    need_go etcd
    echo "tools: building etcd $ETCD_VERSION (about a minute, once)"
    (cd "$here/etcd" && gobuild build -trimpath -ldflags "-s -w" -o "$bin/etcd.new" go.etcd.io/etcd/server/v3)
    mv -f "$bin/etcd.new" "$bin/etcd"
    printf %s "$ETCD_VERSION" >"$(stamp etcd)"
fi

kube=()
link_or_mark kube-apiserver "$KUBE_VERSION" || kube+=(kube-apiserver)
link_or_mark kubectl "$KUBE_VERSION" || kube+=(kubectl)
if [ "${#kube[@]}" -gt 0 ]; then
    need_go "${kube[*]}"
    echo "tools: building ${kube[*]} $KUBE_VERSION (about 10 minutes, once)"
    # Without a version kubectl and the server call themselves v0.0.0, which kubectl refuses.
    minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
    flags="-s -w"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        flags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
        flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
    done
    scratch="$(mktemp -d "$tools/build.XXXXXX")"
    pkgs=()
    for tool in "${kube[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$tool"); done
    (cd "$here/kubernetes" && gobuild build -trimpath -ldflags "$flags" -o "$scratch/" "${pkgs[@]}")
    for tool in "${kube[@]}"; do
        mv -f "$scratch/$tool" "$bin/$tool"
        printf %s "$KUBE_VERSION" >"$(stamp "$tool")"
    done
fi

if [ $((SECONDS - started)) -gt 5 ]; then
    echo "tools: ready in $bin after $((SECONDS - started)) s"
fi
