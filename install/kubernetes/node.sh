#!/bin/sh
# Runs in the DaemonSet's pod (privileged, host PID namespace). COREPIPE_MODE picks how crashes are collected:
#   socket (auto's choice where /proc/sys/kernel/core_modes lists it, Linux 6.16+): `corepipe serve` runs here,
#     in the pod, on the hostPath socket /run/corepipe/coredump.socket; the kernel streams cores to it and
#     nothing is installed or executed on the node. The server writes kernel.core_pattern from the node's
#     mount namespace and gives the previous pattern back when the pod stops (SIGTERM) or the server dies.
#   pipe: this image's checkout is put on the node and install/install.sh runs in the node's own namespaces
#     (the kernel runs a pipe handler on the host, never in a pod); the preStop hook (`node.sh stop`)
#     runs `corepipe uninstall` there.
# COREPIPE_* variables reach install.sh (nsenter keeps the environment); COREPIPE_NODE_PID is the host
# process whose namespaces are entered (1, the node's init; tests give another host process).
set -eu
node_pid="${COREPIPE_NODE_PID:-1}"
mode_file=/tmp/corepipe-pod-mode   # the pod's own /run is the node's, read-only
on_node() { /usr/bin/nsenter --target "$node_pid" --mount --uts --ipc --net --pid --cgroup -- "$@"; }
# COREPIPE_SHIP_TO set: `corepipe ship` runs here, in the pod (its credentials are the pod's Secret or workload
# identity, never the node's or a crashed container's), on the node's store, mounted at the same path.
start_shipper() {
    [ -n "${COREPIPE_SHIP_TO:-}" ] || return 1
    printf 'store = "%s"\ndelete_after_ship = %s\n' "${COREPIPE_STORE:-/var/lib/corepipe}" \
        "${COREPIPE_DELETE_AFTER_SHIP:-false}" > /tmp/corepipe-ship.toml
    /opt/corepipe/bin/python -I -m corepipe --config /tmp/corepipe-ship.toml ship --to "$COREPIPE_SHIP_TO" \
        --node "${NODE_NAME:-$(hostname)}" &
    shipper=$!
}

if [ "${1:-}" = stop ]; then   # the preStop hook
    if [ "$(cat "$mode_file" 2>/dev/null)" = pipe ]; then
        on_node "${COREPIPE_BIN:-/usr/local/bin/corepipe}" uninstall --config "${COREPIPE_CONFIG:-/etc/corepipe/config.toml}"
    fi
    exit 0   # socket mode: the server puts the pattern back itself on SIGTERM
fi

mode="${COREPIPE_MODE:-auto}"
if [ "$mode" = auto ]; then
    if grep -qx socket /proc/sys/kernel/core_modes 2>/dev/null; then mode=socket; else mode=pipe; fi
fi
echo "$mode" > "$mode_file"

if [ "$mode" = socket ]; then
    store="${COREPIPE_STORE:-/var/lib/corepipe}"   # a hostPath at the same path
    mkdir -p /etc/corepipe
    printf 'store = "%s"\n' "$store" > /etc/corepipe/config.toml
    echo "corepipe: socket mode: serving /run/corepipe/coredump.socket in this pod"
    serve="/opt/corepipe/bin/python -I -m corepipe serve --config /etc/corepipe/config.toml \
        --socket /run/corepipe/coredump.socket --run-dir /run/corepipe --host-pid $node_pid ${COREPIPE_SERVE_ARGS:-}"
    if ! start_shipper; then
        # shellcheck disable=SC2086 # a command line of options
        exec $serve
    fi
    # shellcheck disable=SC2086
    $serve &
    server=$!
    # SIGTERM: the server finishes the crashes it has taken and puts the pattern back; the shipper stops.
    trap 'kill -TERM "$server" "$shipper" 2>/dev/null || true' TERM INT
    wait "$server" || true
    wait "$server" 2>/dev/null || true
    kill -TERM "$shipper" 2>/dev/null || true
    exit 0
fi

host_src="${COREPIPE_HOST_SRC:-/opt/corepipe-src}"   # the hostPath mounted at /host-src
rm -rf /host-src/checkout
cp -a /corepipe /host-src/checkout
# shellcheck disable=SC2086 # COREPIPE_INSTALL_ARGS is a list of options
on_node bash "$host_src/checkout/install/install.sh" --mode pipe --store "${COREPIPE_STORE:-/var/lib/corepipe}" \
    ${COREPIPE_INSTALL_ARGS:-}
if start_shipper; then
    trap 'kill "$shipper" 2>/dev/null; exit 0' TERM INT
    echo "corepipe installed on the node; shipping its crashes to $COREPIPE_SHIP_TO"
    wait "$shipper" || true
    exit 1  # the shipper stopped by itself: let the kubelet restart the pod
fi
echo "corepipe installed on the node; waiting (the preStop hook uninstalls it when this pod is removed)"
trap 'exit 0' TERM INT
while :; do sleep 3600 & wait $!; done
