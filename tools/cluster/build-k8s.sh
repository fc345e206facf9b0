#!/usr/bin/env bash
# Kubernetes node binaries built from the Go module proxy, cached under $K8S_BIN with a stamp:
# kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy, kubectl, CoreDNS
# and Rancher's local-path provisioner.
#
# k8s.io/kubernetes's go.mod points its k8s.io/* staging modules at ./staging folders that the
# module zip leaves out, so a wrapper module requires k8s.io/kubernetes and replaces each staging
# module by its published k8s.io/<name> v0.<minor>.<patch>. 1.34 is the newest minor whose kubelet
# still runs on cgroup v1 (this kind of machine has a hybrid v1 layout).
set -euo pipefail
: "${K8S_VERSION:?}" "${COREDNS_VERSION:?}" "${LOCAL_PATH_VERSION:?}" "${K8S_BIN:?}"
export PATH=/usr/local/go/bin:$PATH GOFLAGS=-mod=mod CGO_ENABLED=0
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mkdir -p "$K8S_BIN"
cd "$work"

go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" > /dev/null
kdir=$(go env GOMODCACHE)/k8s.io/kubernetes@v$K8S_VERSION
{
  printf 'module local/k8sbuild\n\ngo 1.24.0\n\ngodebug default=go1.24\n\n'
  printf 'require k8s.io/kubernetes v%s\n\nreplace (\n' "$K8S_VERSION"
  grep -E '^\s+k8s.io/[a-z0-9-]+ => ./staging' "$kdir/go.mod" \
    | awk -v v="0.${K8S_VERSION#1.}" '{print "\t" $1 " => " $1 " v" v}'
  printf ')\n'
} > go.mod
cmds="kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl"
pkgs=$(for c in $cmds; do echo "k8s.io/kubernetes/cmd/$c"; done)
echo "resolving k8s.io/kubernetes v$K8S_VERSION"
go get $(for p in $pkgs; do echo "$p@v$K8S_VERSION"; done)
ldflags="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags="$ldflags -X $p.gitVersion=v$K8S_VERSION -X $p.gitMajor=1"
  ldflags="$ldflags -X $p.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2) -X $p.gitTreeState=clean"
done
echo "building $cmds"
nice -n 5 go build -trimpath -ldflags "$ldflags" -o "$K8S_BIN/" $pkgs

echo "building coredns $COREDNS_VERSION, local-path-provisioner $LOCAL_PATH_VERSION"
GOBIN=$K8S_BIN nice -n 5 go install -trimpath -ldflags '-s -w' "github.com/coredns/coredns@$COREDNS_VERSION"
GOBIN=$K8S_BIN nice -n 5 go install -trimpath -ldflags '-s -w' \
  "github.com/rancher/local-path-provisioner@$LOCAL_PATH_VERSION"
# the pause container's source ships in the module zip; built static, it needs no base image
gcc -Os -static -DVERSION="v$K8S_VERSION-ctloop" -o "$K8S_BIN/pause" "$kdir/build/pause/linux/pause.c"
strip "$K8S_BIN/pause"
ls -la "$K8S_BIN"
