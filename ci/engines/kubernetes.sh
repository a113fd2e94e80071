#!/usr/bin/env bash
# A single-node Kubernetes v1.20.2 on loopback, for the Kubernetes driver's tests: etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler and a real kubelet on the Docker
# Engine (ci/engines/docker.sh first).
#
# Nothing prebuilt can be fetched here, so the four binaries are built once from Debian
# bookworm's own `kubernetes` source package (the full upstream tree with vendor/, built
# offline with Debian's Go 1.19; about 11 minutes on 2 cores) into $K8S_CACHE
# (/var/cache/k8s-1.20.2), and reused after that. etcd is Debian's etcd-server.
#
#   ci/engines/kubernetes.sh build    build the binaries (once)
#   ci/engines/kubernetes.sh start    build if needed, start the cluster, print KUBECONFIG
#
# The kubeconfig is written to $K8S_DIR/kubeconfig (default /tmp/upshift-k8s).
set -euo pipefail

CACHE=${K8S_CACHE:-/var/cache/k8s-1.20.2}
DIR=${K8S_DIR:-/tmp/upshift-k8s}
here=$(cd "$(dirname "$0")" && pwd)

build() {
    [ -x "$CACHE/kubelet" ] && return 0
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q golang-go rsync jq etcd-server dpkg-dev >/dev/null
    if [ ! -f /etc/apt/sources.list.d/upshift-debian-src.sources ]; then
        # The same mirrors, for source packages.
        sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
            > /etc/apt/sources.list.d/upshift-debian-src.sources
        apt-get update -q >/dev/null
    fi
    local src
    src=$(mktemp -d)
    (
        cd "$src"
        apt-get source kubernetes >/dev/null 2>&1
        cd kubernetes-*/
        export CGO_ENABLED=0 GOFLAGS=-p=${JOBS:-2} GOPROXY=off KUBE_GIT_VERSION=v1.20.2 KUBE_GIT_MAJOR=1 \
            KUBE_GIT_MINOR=20 KUBE_GIT_TREE_STATE=clean KUBE_GIT_COMMIT=debian
        nice -n 19 make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet" >/dev/null
        mkdir -p "$CACHE"
        cp _output/bin/{kube-apiserver,kube-controller-manager,kube-scheduler,kubelet} "$CACHE/"
    )
    rm -rf "$src"
}

start() {
    build
    command -v etcd >/dev/null || apt-get install -y -q etcd-server jq >/dev/null
    # The kubelet's port-forward (dockershim) runs socat in the pod's network namespace.
    command -v socat >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q socat >/dev/null
    command -v kubectl >/dev/null || { echo "kubectl is needed" >&2; exit 1; }
    if [ -f "$DIR/kubeconfig" ] && KUBECONFIG="$DIR/kubeconfig" kubectl get --raw /readyz >/dev/null 2>&1; then
        echo "$DIR/kubeconfig"
        return 0
    fi
    # The kubelet's containers need runc behind the oom_score_adj clamp as dockerd's default
    # runtime (ci/engines/docker.sh starts it so); a dockerd started otherwise is restarted.
    if [ "$(docker info --format '{{.DefaultRuntime}}' 2>/dev/null)" != upshift-runc ]; then
        echo "restarting dockerd with the upshift-runc runtime (the kubelet needs it)" >&2
        pkill -x dockerd || true
        for _ in $(seq 1 100); do pgrep -x dockerd >/dev/null || break; sleep 0.2; done
        bash "$here/docker.sh" >&2
    fi
    # The pod sandbox image must be local: any static binary that sleeps.
    if ! docker image inspect upshift/pause:1 >/dev/null 2>&1; then
        local pause
        pause=$(mktemp -d)
        cp "$(command -v busybox)" "$pause/busybox"
        tar -C "$pause" -c busybox | docker import --change 'ENTRYPOINT ["/busybox", "sleep", "2147483647"]' - upshift/pause:1 >/dev/null
        rm -rf "$pause"
    fi
    # A cluster that stopped without cleaning up (a killed session, a reboot of the processes
    # but not the mounts) leaves the kubelet's bind mount of its root dir and the pods' secret
    # tmpfs mounts behind; unmount them, deepest first, before the directory can go.
    pkill -f -- "$DIR/" 2>/dev/null || true
    for _ in $(seq 1 50); do pgrep -f -- "$DIR/" >/dev/null || break; sleep 0.2; done
    awk -v d="$DIR/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
        umount "$m" 2>/dev/null || umount -l "$m"
    done
    rm -rf "$DIR"
    mkdir -p "$DIR/pki"
    openssl genrsa -out "$DIR/pki/sa.key" 2048 2>/dev/null
    openssl rsa -in "$DIR/pki/sa.key" -pubout -out "$DIR/pki/sa.pub" 2>/dev/null
    local token
    token=$(head -c16 /dev/urandom | od -An -tx1 | tr -d ' \n')
    echo "$token,admin,admin,system:masters" > "$DIR/pki/tokens.csv"
    cat > "$DIR/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters: [{name: local, cluster: {server: "https://127.0.0.1:16443", insecure-skip-tls-verify: true}}]
users: [{name: admin, user: {token: "$token"}}]
contexts: [{name: local, context: {cluster: local, user: admin, namespace: default}}]
current-context: local
KC
    chmod 0600 "$DIR/kubeconfig"
    export KUBECONFIG=$DIR/kubeconfig
    nohup etcd --name t --data-dir "$DIR/etcd" --listen-client-urls http://127.0.0.1:23790 \
        --advertise-client-urls http://127.0.0.1:23790 --listen-peer-urls http://127.0.0.1:23800 \
        --initial-advertise-peer-urls http://127.0.0.1:23800 --initial-cluster t=http://127.0.0.1:23800 \
        --unsafe-no-fsync > "$DIR/etcd.log" 2>&1 &
    nohup "$CACHE/kube-apiserver" --etcd-servers=http://127.0.0.1:23790 --bind-address=127.0.0.1 --secure-port=16443 \
        --insecure-port=0 --advertise-address=127.0.0.1 --cert-dir="$DIR/pki/serving" \
        --token-auth-file="$DIR/pki/tokens.csv" --authorization-mode=RBAC \
        --service-account-issuer=https://kubernetes.default.svc --service-account-key-file="$DIR/pki/sa.pub" \
        --service-account-signing-key-file="$DIR/pki/sa.key" --service-cluster-ip-range=10.96.0.0/16 \
        --kubelet-preferred-address-types=InternalIP \
        > "$DIR/apiserver.log" 2>&1 &
    for _ in $(seq 1 200); do
        [ "$(curl -sk -m2 -H "Authorization: Bearer $token" https://127.0.0.1:16443/readyz)" = ok ] && break
        sleep 0.3
    done
    nohup "$CACHE/kube-controller-manager" --kubeconfig="$KUBECONFIG" --leader-elect=false --port=0 --secure-port=0 \
        --service-account-private-key-file="$DIR/pki/sa.key" --use-service-account-credentials=false \
        > "$DIR/kcm.log" 2>&1 &
    nohup "$CACHE/kube-scheduler" --kubeconfig="$KUBECONFIG" --leader-elect=false --port=0 --secure-port=0 \
        > "$DIR/scheduler.log" 2>&1 &
    # The kubelet listens on the Docker bridge's address, which the API server dials for
    # exec, logs and port-forward (a node IP cannot be loopback); nothing outside reaches it.
    local node_ip
    node_ip=$(ip -4 -o addr show docker0 | awk '{ split($4, a, "/"); print a[1] }')
    nohup "$CACHE/kubelet" --kubeconfig="$KUBECONFIG" --hostname-override=node-1 --node-ip="$node_ip" --container-runtime=docker \
        --pod-infra-container-image=upshift/pause:1 --cgroup-driver=cgroupfs --fail-swap-on=false \
        --root-dir="$DIR/kubelet" --cert-dir="$DIR/kubelet/pki" --address="$node_ip" --read-only-port=0 \
        --healthz-port=0 --cgroups-per-qos=false --enforce-node-allocatable= --image-gc-high-threshold=100 \
        --image-gc-low-threshold=99 --eviction-hard= --authentication-token-webhook=false \
        --authorization-mode=AlwaysAllow > "$DIR/kubelet.log" 2>&1 &
    for _ in $(seq 1 3); do
        kubectl wait --for=condition=Ready node/node-1 --timeout=120s >/dev/null 2>&1 && break
        sleep 2
    done
    kubectl wait --for=condition=Ready node/node-1 --timeout=10s >/dev/null
    echo "$DIR/kubeconfig"
}

case "${1:-start}" in
    build) build ;;
    start) start ;;
    *) echo "usage: $0 build|start" >&2; exit 2 ;;
esac
