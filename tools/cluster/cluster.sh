#!/usr/bin/env bash
# A single-node Kubernetes on this machine, from the binaries build-k8s.sh makes and Debian's
# etcd, containerd, runc and CNI plugins (make cluster-up / cluster-down / cluster-status).
#   cluster.sh up       start (or re-start) the node: containerd, etcd, control plane, kubelet,
#                       kube-proxy; the images of $IMAGES_DIR/images.txt; CoreDNS + local-path StorageClass
#   cluster.sh down     stop everything and remove what it made: pods first (so the kubelet
#                       releases their network), processes, mounts, iptables chains, cni0, state
#                       (the PKI and containerd's image store stay for a fast next `up`;
#                       PURGE=1 removes them too)
#   cluster.sh status   processes, node and pods; exit 1 when the node is not Ready
# Env: CLUSTER_DIR (state), K8S_BIN (binaries), IMAGES_DIR (images.txt). Runs as root.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
: "${CLUSTER_DIR:?}" "${K8S_BIN:?}" "${IMAGES_DIR:?}"
DIR=$CLUSTER_DIR
PROCS=(containerd etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)
NODE=$(hostname | tr 'A-Z' 'a-z')
IP=$(hostname -I | awk '{print $1}')
export KUBECONFIG=$DIR/admin.kubeconfig
kubectl() { "$K8S_BIN/kubectl" "$@"; }
ctr_() { ctr -a "$DIR/containerd/containerd.sock" -n k8s.io "$@"; }
say() { printf '[cluster] %s\n' "$*"; }
alive() { [ -f "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

pki() {  # one CA, the apiserver's serving cert, a client cert per component
  [ -f "$DIR/pki/ca.crt" ] && return 0
  mkdir -p "$DIR/pki"; (cd "$DIR/pki"
  openssl genrsa -out ca.key 2048 2>/dev/null
  openssl req -x509 -new -nodes -key ca.key -subj "/CN=ctloop-local-k8s-ca" -days 3650 -out ca.crt
  cert() {  # file, CN, O, SAN, usage
    openssl genrsa -out "$1.key" 2048 2>/dev/null
    openssl req -new -key "$1.key" -subj "/CN=$2${3:+/O=$3}" -out "$1.csr"
    { echo "basicConstraints=CA:FALSE"; echo "keyUsage=digitalSignature,keyEncipherment"
      echo "extendedKeyUsage=${5:-clientAuth}"; [ -n "$4" ] && echo "subjectAltName=$4"; } > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile "$1.ext" -out "$1.crt" 2>/dev/null; rm -f "$1.csr" "$1.ext"; }
  local sans="IP:127.0.0.1,IP:$IP,IP:10.96.0.1,DNS:localhost,DNS:$NODE,DNS:kubernetes"
  sans="$sans,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert apiserver kube-apiserver "" "$sans" serverAuth
  cert kubelet-serving "system:node:$NODE" "system:nodes" "IP:$IP,IP:127.0.0.1,DNS:$NODE" serverAuth
  cert admin admin system:masters ""; cert kubelet "system:node:$NODE" system:nodes ""
  cert kcm system:kube-controller-manager "" ""; cert sched system:kube-scheduler "" ""
  cert proxy system:kube-proxy "" ""
  openssl genrsa -out sa.key 2048 2>/dev/null; openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null)
}

configs() {
  mkdir -p "$DIR"/{etcd,containerd,kubelet,logs,cni/net.d,podlogs,manifests,volumes}
  for u in admin kubelet kcm sched proxy; do cat > "$DIR/$u.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters: [{name: local, cluster: {server: "https://127.0.0.1:6443", certificate-authority: $DIR/pki/ca.crt}}]
users: [{name: u, user: {client-certificate: $DIR/pki/$u.crt, client-key: $DIR/pki/$u.key}}]
contexts: [{name: local, context: {cluster: local, user: u}}]
current-context: local
KC
  done
  # containerd: CRI with runc and cgroupfs. restrict_oom_score_adj: the kubelet asks sandboxes for
  # oom_score_adj -998, which needs CAP_SYS_RESOURCE that this sandbox lacks.
  cat > "$DIR/containerd/config.toml" <<CT
version = 2
root = "$DIR/containerd/root"
state = "$DIR/containerd/state"
[grpc]
  address = "$DIR/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/pause:3.10"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "$(command -v runc)"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$DIR/cni/net.d"
CT
  cat > "$DIR/cni/net.d/10-ctloop.conflist" <<'CN'
{"cniVersion": "0.4.0", "name": "ctloop-pods", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
CN
  # cgroup v1 (hybrid layout here): failCgroupV1 false keeps 1.34's kubelet on it
  cat > "$DIR/kubelet.yaml" <<KL
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failCgroupV1: false
containerRuntimeEndpoint: unix://$DIR/containerd/containerd.sock
failSwapOn: false
tlsCertFile: $DIR/pki/kubelet-serving.crt
tlsPrivateKeyFile: $DIR/pki/kubelet-serving.key
authentication: {anonymous: {enabled: false}, webhook: {enabled: true}, x509: {clientCAFile: $DIR/pki/ca.crt}}
authorization: {mode: Webhook}
clusterDomain: cluster.local
clusterDNS: [10.96.0.10]
staticPodPath: $DIR/manifests
podLogsDir: $DIR/podlogs
resolvConf: /etc/resolv.conf
protectKernelDefaults: false
maxPods: 60
# absolute floors, not percentages: on a big shared disk 2% is GBs, and under disk pressure the
# kubelet deletes images it cannot pull back
evictionHard: {memory.available: "300Mi", nodefs.available: "1Gi", imagefs.available: "1Gi", nodefs.inodesFree: "1%"}
# no image garbage collection: the images come from make images, not from a registry, so
# one the kubelet deleted could not be pulled back
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
KL
}

start() {  # name, command...
  local n=$1; shift
  alive "$n" && return 0
  nohup nice -n 5 "$@" > "$DIR/logs/$n.log" 2>&1 &
  echo $! > "$DIR/$n.pid"
}

wait_for() {  # seconds, what, command...
  local s=$1 what=$2; shift 2
  for _ in $(seq "$s"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  say "timed out after ${s}s waiting for $what (logs: $DIR/logs)"; return 1
}

import_images() {  # stream the images `make images` listed from podman's store into containerd
  local list=$IMAGES_DIR/images.txt done=$DIR/containerd/imported.txt
  [ -f "$list" ] || { say "no $list: run make images"; return 1; }
  cmp -s "$list" "$done" 2>/dev/null && return 0
  say "importing $(wc -l < "$list") images into containerd (podman save | ctr import)"
  # Unpacked here, one image after another: left to the first pods, several of them unpack the
  # same 6 GB of layers side by side (each CreateContainer timing out: tens of GB of snapshots).
  # shellcheck disable=SC2046  # one ref per line
  CONTAINERS_CONF=$here/containers.conf podman save --multi-image-archive --format docker-archive \
    $(cut -d' ' -f1 "$list") | ctr_ images import - >/dev/null
  cp "$list" "$done"
}

up() {
  [ "$(id -u)" = 0 ] || { echo "cluster.sh up needs root (containerd, kubelet, iptables)"; exit 1; }
  local t0=$SECONDS
  pki; configs
  start containerd containerd --config "$DIR/containerd/config.toml"
  start etcd etcd --name "$NODE" --data-dir "$DIR/etcd" --listen-client-urls http://127.0.0.1:2379 \
    --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 \
    --initial-advertise-peer-urls http://127.0.0.1:2380 --initial-cluster "$NODE=http://127.0.0.1:2380" \
    --quota-backend-bytes=2147483648
  wait_for 30 containerd test -S "$DIR/containerd/containerd.sock"
  import_images
  start kube-apiserver "$K8S_BIN/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
    --advertise-address="$IP" --secure-port=6443 --tls-cert-file="$DIR/pki/apiserver.crt" \
    --tls-private-key-file="$DIR/pki/apiserver.key" --client-ca-file="$DIR/pki/ca.crt" \
    --service-account-key-file="$DIR/pki/sa.pub" --service-account-signing-key-file="$DIR/pki/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range=10.96.0.0/16 --authorization-mode=Node,RBAC \
    --enable-admission-plugins=NodeRestriction --allow-privileged=true \
    --kubelet-certificate-authority="$DIR/pki/ca.crt" \
    --kubelet-client-certificate="$DIR/pki/admin.crt" --kubelet-client-key="$DIR/pki/admin.key"
  wait_for 120 "the API server" curl -sf --cacert "$DIR/pki/ca.crt" https://127.0.0.1:6443/readyz
  start kube-controller-manager "$K8S_BIN/kube-controller-manager" --kubeconfig="$DIR/kcm.kubeconfig" \
    --authentication-kubeconfig="$DIR/kcm.kubeconfig" --authorization-kubeconfig="$DIR/kcm.kubeconfig" \
    --service-account-private-key-file="$DIR/pki/sa.key" --root-ca-file="$DIR/pki/ca.crt" \
    --cluster-signing-cert-file="$DIR/pki/ca.crt" --cluster-signing-key-file="$DIR/pki/ca.key" \
    --use-service-account-credentials=true --leader-elect=false --service-cluster-ip-range=10.96.0.0/16
  start kube-scheduler "$K8S_BIN/kube-scheduler" --kubeconfig="$DIR/sched.kubeconfig" \
    --authentication-kubeconfig="$DIR/sched.kubeconfig" --authorization-kubeconfig="$DIR/sched.kubeconfig" \
    --leader-elect=false
  start kubelet "$K8S_BIN/kubelet" --config="$DIR/kubelet.yaml" --kubeconfig="$DIR/kubelet.kubeconfig" \
    --root-dir="$DIR/kubelet" --hostname-override="$NODE" --node-ip="$IP"
  start kube-proxy "$K8S_BIN/kube-proxy" --kubeconfig="$DIR/proxy.kubeconfig" --hostname-override="$NODE" \
    --cluster-cidr=10.244.0.0/16 --proxy-mode=iptables --conntrack-max-per-core=0
  wait_for 120 "node $NODE Ready" sh -c "'$K8S_BIN/kubectl' get node '$NODE' | grep -qw Ready"
  sed "s#LOCAL_PATH_DIR#$DIR/volumes#" "$here/addons.yaml" | kubectl apply -f - >/dev/null
  kubectl -n kube-system rollout status deploy/coredns --timeout=180s >/dev/null
  kubectl -n local-path-storage rollout status deploy/local-path-provisioner --timeout=180s >/dev/null
  say "node $NODE Ready with DNS and a default StorageClass in $((SECONDS - t0)) s"
  say "export KUBECONFIG=$KUBECONFIG"
}

down() {
  if alive kubelet && alive kube-apiserver; then  # the kubelet tears pods down (CNI DEL, unmounts)
    say "deleting workloads"
    kubectl delete ns --all --wait=false --field-selector 'metadata.name!=default,metadata.name!=kube-system,metadata.name!=kube-public,metadata.name!=kube-node-lease' >/dev/null 2>&1 || true
    kubectl delete deploy,sts,ds,rs,job,pod --all -A --grace-period=1 --wait=false >/dev/null 2>&1 || true
    for _ in $(seq 90); do [ -z "$(kubectl get pods -A -o name 2>/dev/null)" ] && break; sleep 1; done
  fi
  local n p
  for n in kube-proxy kubelet kube-scheduler kube-controller-manager kube-apiserver etcd; do
    alive "$n" || continue; p=$(cat "$DIR/$n.pid"); kill "$p"
    for _ in $(seq 30); do kill -0 "$p" 2>/dev/null || break; sleep 1; done
    kill -9 "$p" 2>/dev/null || true
  done
  if alive containerd; then
    for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s KILL "$t" >/dev/null 2>&1 || true; done
    sleep 1; for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks delete -f "$t" >/dev/null 2>&1 || true; done
    for c in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers delete "$c" >/dev/null 2>&1 || true; done
    p=$(cat "$DIR/containerd.pid"); kill "$p"
    for _ in $(seq 30); do kill -0 "$p" 2>/dev/null || break; sleep 1; done
    kill -9 "$p" 2>/dev/null || true
  fi
  pkill -f "containerd-shim-runc-v2 -namespace k8s.io -address $DIR/" 2>/dev/null || true
  "$K8S_BIN/kube-proxy" --cleanup >/dev/null 2>&1 || true
  local ipt t c
  for ipt in iptables ip6tables; do  # the kubelet's own chains (kube-proxy --cleanup did the rest)
    "$ipt" -D INPUT -j KUBE-FIREWALL 2>/dev/null || true
    "$ipt" -D OUTPUT -j KUBE-FIREWALL 2>/dev/null || true
    for t in filter nat mangle; do
      for c in KUBE-FIREWALL KUBE-KUBELET-CANARY KUBE-IPTABLES-HINT KUBE-MARK-MASQ KUBE-POSTROUTING KUBE-MARK-DROP; do
        "$ipt" -t "$t" -F "$c" 2>/dev/null || true; "$ipt" -t "$t" -X "$c" 2>/dev/null || true
      done
    done
  done
  # the bridge plugin's masquerade rules for the pod subnet
  { iptables-save -t nat 2>/dev/null | grep -oE '^:CNI-[0-9a-f]+' || true; } | tr -d : | while read -r c; do
    iptables -t nat -D POSTROUTING -s 10.244.0.0/24 -j "$c" 2>/dev/null || true
    { iptables-save -t nat | grep -E "^-A POSTROUTING .* -j $c" || true; } | sed 's/^-A/-D/' | while read -r r; do
      eval iptables -t nat "$r" 2>/dev/null || true; done
    iptables -t nat -F "$c" 2>/dev/null || true; iptables -t nat -X "$c" 2>/dev/null || true
  done
  ip link del cni0 2>/dev/null || true
  rm -rf /var/lib/cni/networks/ctloop-pods /var/lib/cni/results/ctloop-pods-*
  grep " $DIR/" /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$DIR"/{etcd,kubelet,logs,podlogs,volumes,manifests} "$DIR"/*.pid "$DIR"/containerd/state
  if [ -n "${PURGE:-}" ]; then rm -rf "$DIR"; say "purged $DIR (images, PKI)"; fi
  say "down: no cluster process, mount, pod network or firewall chain left"
}

status() {
  local n rc=0
  for n in "${PROCS[@]}"; do
    if alive "$n"; then printf '%-24s running (pid %s)\n' "$n" "$(cat "$DIR/$n.pid")"
    else printf '%-24s stopped\n' "$n"; rc=1; fi
  done
  [ $rc = 0 ] || return 1
  kubectl get nodes -o wide && kubectl get pods -A -o wide
  kubectl get node "$NODE" | grep -qw Ready
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  *) sed -n '2,10p' "$0" >&2; exit 2 ;;
esac
