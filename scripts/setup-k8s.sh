#!/usr/bin/env bash
# Builds the Kubernetes control plane the operator's integration tests run
# against: etcd, kube-apiserver, kube-controller-manager (StatefulSet, garbage
# collector, namespace controllers), kubectl and helm, from the Go module
# proxy. Binaries are cached per version in ~/.cache/synod/k8s/<version>/bin
# and reused; a second run only checks them. Writes SYNOD_K8S_BIN and PATH to
# ~/.cache/synod/test-env.sh.
#
# The versions are pinned by the wrapper modules in scripts/k8s/: change them
# with scripts/k8s/gen-kubernetes-gomod.sh, not here.
#
# Environment: SYNOD_GO_BUILD_JOBS (default 2) bounds parallel compilation;
# SYNOD_CACHE (default ~/.cache/synod) moves the cache.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

helm_version=v3.22.0
cache=${SYNOD_CACHE:-$HOME/.cache/synod}
jobs=${SYNOD_GO_BUILD_JOBS:-2}

# The modules need Go 1.26; a machine with an older Go cannot build them.
go_required=1.26
if ! command -v go >/dev/null; then
    echo "setup-k8s: step 'find Go' failed: no 'go' on PATH (Go >= $go_required is needed)" >&2
    exit 1
fi
go_have=$(go env GOVERSION | sed 's/^go//')
if [ "$(printf '%s\n%s\n' "$go_required" "$go_have" | sort -V | head -n1)" != "$go_required" ]; then
    echo "setup-k8s: step 'find Go' failed: Go $go_have is older than $go_required" >&2
    exit 1
fi

# The versions are what the wrapper modules require.
module_version() {
    awk -v m="$1" '$1 == "require" && $2 == m { print $3; exit } $1 == m && $2 ~ /^v/ { print $2; exit }' "$2"
}
k8s_version=$(module_version k8s.io/kubernetes scripts/k8s/kubernetes/go.mod)
etcd_version=$(module_version go.etcd.io/etcd/server/v3 scripts/k8s/etcd/go.mod)
if [ -z "$k8s_version" ] || [ -z "$etcd_version" ]; then
    echo "setup-k8s: step 'read versions' failed: scripts/k8s/*/go.mod do not name k8s.io/kubernetes and go.etcd.io/etcd/server/v3" >&2
    exit 1
fi
bin=$cache/k8s/$k8s_version/bin
mkdir -p "$bin"

export GOFLAGS=-mod=mod
export CGO_ENABLED=0
total_start=$SECONDS

# A binary is reused when its stamp names the same source version and the
# same wrapper go.sum; anything else rebuilds it.
stamp_of() { echo "$1 $(cat "$2" 2>/dev/null | sha256sum | cut -c1-16)"; }
fresh() { [ -x "$bin/$1" ] && [ "$(cat "$bin/.$1.stamp" 2>/dev/null)" = "$2" ]; }

# Builds in a copy of the wrapper module so that the Go command's go.mod and
# go.sum updates never touch the repository.
build_dir=$(mktemp -d)
trap 'rm -rf "$build_dir"' EXIT
copy_module() {
    rm -rf "${build_dir:?}/$1"
    cp -r "scripts/k8s/$1" "$build_dir/$1"
}

run_step() {
    local what=$1
    shift
    local start=$SECONDS
    echo "setup-k8s: $what"
    if ! "$@"; then
        echo "setup-k8s: step '$what' failed after $((SECONDS - start))s (command: $*)" >&2
        exit 1
    fi
    echo "setup-k8s: $what took $((SECONDS - start))s"
}

# Kubernetes: the version is stamped into the binaries as the release build
# does, so `kubectl version` and the API server's /version report it.
k8s_minor=$(echo "$k8s_version" | cut -d. -f2)
k8s_ldflags="-s -w \
 -X k8s.io/component-base/version.gitVersion=$k8s_version \
 -X k8s.io/component-base/version.gitMajor=1 \
 -X k8s.io/component-base/version.gitMinor=$k8s_minor \
 -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/client-go/pkg/version.gitVersion=$k8s_version \
 -X k8s.io/client-go/pkg/version.gitMajor=1 \
 -X k8s.io/client-go/pkg/version.gitMinor=$k8s_minor"
k8s_stamp=$(stamp_of "$k8s_version" scripts/k8s/kubernetes/go.sum)
k8s_todo=()
for cmd in kube-apiserver kube-controller-manager kubectl; do
    fresh "$cmd" "$k8s_stamp" || k8s_todo+=("$cmd")
done
if [ ${#k8s_todo[@]} -gt 0 ]; then
    copy_module kubernetes
    run_step "download modules of k8s.io/kubernetes $k8s_version" \
        bash -c "cd '$build_dir/kubernetes' && go mod download"
    for cmd in "${k8s_todo[@]}"; do
        run_step "build k8s.io/kubernetes/cmd/$cmd@$k8s_version" \
            bash -c "cd '$build_dir/kubernetes' && go build -p $jobs -trimpath -ldflags='$k8s_ldflags' -o '$bin/$cmd' k8s.io/kubernetes/cmd/$cmd"
        echo "$k8s_stamp" >"$bin/.$cmd.stamp"
    done
fi

# etcd: the server module's main package, wrapped so its sibling modules
# resolve from the proxy.
etcd_stamp=$(stamp_of "$etcd_version" scripts/k8s/etcd/go.sum)
if ! fresh etcd "$etcd_stamp"; then
    copy_module etcd
    run_step "download modules of go.etcd.io/etcd/server/v3 $etcd_version" \
        bash -c "cd '$build_dir/etcd' && go mod download"
    run_step "build go.etcd.io/etcd/server/v3 (etcdmain) $etcd_version" \
        bash -c "cd '$build_dir/etcd' && go build -p $jobs -trimpath -ldflags='-s -w' -o '$bin/etcd' ."
    echo "$etcd_stamp" >"$bin/.etcd.stamp"
fi

# helm: its module has no replace directives, so `go install` works as is.
helm_stamp="$helm_version"
if ! fresh helm "$helm_stamp"; then
    run_step "build helm.sh/helm/v3/cmd/helm@$helm_version" \
        bash -c "cd '$build_dir' && GOFLAGS= GOBIN='$bin' go install -p $jobs -trimpath -ldflags='-s -w' helm.sh/helm/v3/cmd/helm@$helm_version"
    echo "$helm_stamp" >"$bin/.helm.stamp"
fi

# Each binary must at least run on this machine.
for cmd in etcd kube-apiserver kube-controller-manager; do
    run_step "check $cmd runs" bash -c "'$bin/$cmd' --version >/dev/null"
done
run_step "check kubectl runs" bash -c "'$bin/kubectl' version --client >/dev/null"
run_step "check helm runs" bash -c "'$bin/helm' version --short >/dev/null"

# Tests find the binaries through SYNOD_K8S_BIN; people and scripts through PATH.
env_file=${SYNOD_TEST_ENV:-$cache/test-env.sh}
mkdir -p "$(dirname "$env_file")"
touch "$env_file"
marker="# written by scripts/setup-k8s.sh"
grep -vF "$marker" "$env_file" >"$env_file.tmp" || true
{
    echo "export SYNOD_K8S_BIN='$bin' $marker"
    echo "export PATH=\"$bin:\$PATH\" $marker"
} >>"$env_file.tmp"
mv "$env_file.tmp" "$env_file"

echo "setup-k8s: Kubernetes $k8s_version, etcd $etcd_version, helm $helm_version in $bin"
echo "setup-k8s: done in $((SECONDS - total_start))s"
cd "$repo"
