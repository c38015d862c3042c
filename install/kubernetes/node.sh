#!/bin/sh
# Runs in the DaemonSet's pod (privileged, host PID namespace): puts this image's checkout on the node
# and runs install/install.sh in the node's own namespaces, because the kernel runs the core handler
# on the host, never in a pod. Then waits; the pod's preStop hook runs `corepipe uninstall`.
# COREPIPE_* variables reach install.sh (nsenter keeps the environment); COREPIPE_NODE_PID is the
# host process whose namespaces are entered (1, the node's init; tests give another host process).
set -eu
host_src="${COREPIPE_HOST_SRC:-/opt/corepipe-src}"   # the hostPath mounted at /host-src
rm -rf /host-src/checkout
cp -a /corepipe /host-src/checkout
# shellcheck disable=SC2086 # COREPIPE_INSTALL_ARGS is a list of options
/usr/bin/nsenter --target "${COREPIPE_NODE_PID:-1}" --mount --uts --ipc --net --pid --cgroup -- \
    bash "$host_src/checkout/install/install.sh" --store "${COREPIPE_STORE:-/var/lib/corepipe}" ${COREPIPE_INSTALL_ARGS:-}
if [ -n "${COREPIPE_SHIP_TO:-}" ]; then
    # The shipper runs here, in the pod (its credentials: the pod's Secret or workload identity, never the
    # node's or a crashed container's), on the node's store mounted at the same path.
    config=/tmp/corepipe-ship.toml
    printf 'store = "%s"\ndelete_after_ship = %s\n' "${COREPIPE_STORE:-/var/lib/corepipe}" \
        "${COREPIPE_DELETE_AFTER_SHIP:-false}" > "$config"
    /opt/corepipe/bin/corepipe --config "$config" ship --to "$COREPIPE_SHIP_TO" --node "${NODE_NAME:-$(hostname)}" &
    shipper=$!
    trap 'kill "$shipper" 2>/dev/null; exit 0' TERM INT
    echo "corepipe installed on the node; shipping its crashes to $COREPIPE_SHIP_TO"
    wait "$shipper"
    exit 1  # the shipper stopped by itself: let the kubelet restart the pod
fi
echo "corepipe installed on the node; waiting (the preStop hook uninstalls it when this pod is removed)"
trap 'exit 0' TERM INT
while :; do sleep 3600 & wait $!; done
