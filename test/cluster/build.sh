#!/usr/bin/env bash
# Builds the test control plane (etcd, kube-apiserver, kube-scheduler, kwok) from the Go
# module proxy into test/bin, skipping any binary that is already there. Each piece has its own
# wrapper module here, so that none of them enters the product's go.mod.
#
# First run on a fresh machine: ~8 minutes on 2 cores. Later runs: nothing to do.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="${BUILDFLEET_TEST_BIN:-$here/../bin}"
mkdir -p "$bin"
bin="$(cd "$bin" && pwd)"

# The apiserver built from the module reports gitVersion v0.0.0-master+$Format:%H$, which some
# clients refuse to parse; stamp the real version instead.
kube_version=v1.37.2
kube_ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$kube_version -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=37"

build() { # build <binary> <module dir> <package> [go build flags...]
	local name=$1 dir=$2 pkg=$3
	shift 3
	if [[ -x "$bin/$name" ]]; then
		return
	fi
	echo "building $name (first time only; a few minutes)" >&2
	(cd "$here/$dir" && CGO_ENABLED=0 go build -trimpath -o "$bin/$name.tmp" "$@" "$pkg")
	mv "$bin/$name.tmp" "$bin/$name"
}

build etcd etcd go.etcd.io/etcd/server/v3 -ldflags "-s -w"
build kube-apiserver kube k8s.io/kubernetes/cmd/kube-apiserver -ldflags "$kube_ldflags"
build kube-scheduler kube k8s.io/kubernetes/cmd/kube-scheduler -ldflags "$kube_ldflags"
build kwok kwok sigs.k8s.io/kwok/cmd/kwok -ldflags "-s -w"
