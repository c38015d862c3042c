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
echo "corepipe installed on the node; waiting (the preStop hook uninstalls it when this pod is removed)"
trap 'exit 0' TERM INT
while :; do sleep 3600 & wait $!; done
