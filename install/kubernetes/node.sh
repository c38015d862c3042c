#!/bin/sh
# Runs in the DaemonSet's pod (privileged, host PID namespace). COREPIPE_MODE picks how crashes are collected:
#   socket (auto's choice where /proc/sys/kernel/core_modes lists it, Linux 6.16+): `corepipe serve` runs here,
#     in the pod, on the hostPath socket /run/corepipe/coredump.socket; the kernel streams cores to it and
#     nothing is installed or executed on the node. The server writes kernel.core_pattern from the node's
#     mount namespace and gives the previous pattern back when the pod stops (SIGTERM) or the server dies.
#   pipe: this image's checkout is put on the node and install/install.sh runs in the node's own namespaces
#     (the kernel runs a pipe handler on the host, never in a pod); the preStop hook (`node.sh stop`)
#     runs `corepipe uninstall` there.
#   forward (auto's choice on a node without python3: Container-Optimized OS, Bottlerocket, Flatcar, Talos):
#     the static forwarder (src/corepipe/platform/corepipe-forward.c, built into this image) is copied to the
#     node's COREPIPE_FORWARDER_DIR (default /home/kubernetes/bin, COS's executable path; a hostPath), the
#     kernel's pipe pattern names it, and `corepipe serve --mode pipe` runs here, in the pod: the forwarder
#     hands each crash to it over /run/corepipe/forward.sock. Nothing else is put on the node. The previous
#     pattern comes back when the pod stops; while no server runs, the forwarder drops cores and says so in
#     the kernel log (docs/forwarding.md).
# COREPIPE_* variables reach install.sh (nsenter keeps the environment); COREPIPE_NODE_PID is the host
# process whose namespaces are entered (1, the node's init; tests give another host process).
set -eu
node_pid="${COREPIPE_NODE_PID:-1}"
# What the pod must remember across a restart of its container (the kernel settings to put back): on the node's
# /run/corepipe (a hostPath), not in the container, whose files a restart loses; /run goes at a reboot, and so
# do the kernel's settings.
state_dir="${COREPIPE_POD_STATE:-/run/corepipe}"
mkdir -p "$state_dir"
mode_file="$state_dir/corepipe-pod-mode"
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

python="${COREPIPE_PYTHON:-/opt/corepipe/bin/python}"
pod_config="${COREPIPE_POD_CONFIG:-/etc/corepipe/config.toml}"   # the server's config, in the pod
previous="$state_dir/corepipe-previous"   # forward mode: the kernel settings to put back
restore_kernel() {
    if [ -f "$previous.pattern" ]; then
        cat "$previous.limit" > /proc/sys/kernel/core_pipe_limit
        cat "$previous.pattern" > /proc/sys/kernel/core_pattern
        rm -f "$previous.pattern" "$previous.limit"
    fi
}

if [ "${1:-}" = stop ]; then   # the preStop hook
    if [ "$(cat "$mode_file" 2>/dev/null)" = forward ]; then
        restore_kernel   # first: no crash meets a forwarder whose server is going
    fi
    if [ "$(cat "$mode_file" 2>/dev/null)" = pipe ]; then
        on_node "${COREPIPE_BIN:-/usr/local/bin/corepipe}" uninstall --config "${COREPIPE_CONFIG:-/etc/corepipe/config.toml}"
    fi
    exit 0   # socket mode: the server puts the pattern back itself on SIGTERM; forward mode: done above
fi

mode="${COREPIPE_MODE:-auto}"
if [ "$mode" = auto ]; then
    if grep -qx socket /proc/sys/kernel/core_modes 2>/dev/null; then mode=socket
    elif on_node sh -c 'command -v python3' >/dev/null 2>&1; then mode=pipe
    else mode=forward; fi
fi
echo "$mode" > "$mode_file"

if [ "$mode" = forward ]; then
    store="${COREPIPE_STORE:-/var/lib/corepipe}"   # a hostPath at the same path
    dir="${COREPIPE_FORWARDER_DIR:-/home/kubernetes/bin}"   # a hostPath at the same path
    mkdir -p "$(dirname "$pod_config")" "$dir"
    printf 'store = "%s"\n' "$store" > "$pod_config"
    cp "${COREPIPE_FORWARDER:-/opt/corepipe/bin/corepipe-forward}" "$dir/corepipe-forward.new"
    chmod 0755 "$dir/corepipe-forward.new"
    mv -f "$dir/corepipe-forward.new" "$dir/corepipe-forward"
    pattern="$("$python" -I -c 'import sys; from corepipe.platform.kernel import build_pattern
print(build_pattern(sys.argv[1], sys.argv[2]))' "$dir/corepipe-forward" "$pod_config")"
    limit="$("$python" -I -c 'from corepipe.services.install import PIPE_LIMIT; print(PIPE_LIMIT)')"
    # shellcheck disable=SC2086 # a command line of options
    "$python" -I -m corepipe serve --config "$pod_config" --mode pipe --run-dir "${COREPIPE_RUN_DIR:-/run/corepipe}" \
        ${COREPIPE_SERVE_ARGS:-} &
    server=$!
    case "$(cat /proc/sys/kernel/core_pattern)" in
    "|$dir/corepipe-forward "*)   # an earlier pod's, which died: what it saved goes back, never ours
        if [ ! -f "$previous.pattern" ]; then
            echo "corepipe: kernel.core_pattern is a forwarder's left by an earlier pod; on stop the kernel's" \
                "default comes back (core, core_pipe_limit 0)" >&2
            echo core > "$previous.pattern"
            echo 0 > "$previous.limit"
        fi ;;
    *)   # the node's own (anything saved is stale: the node changed its settings since that pod died)
        cat /proc/sys/kernel/core_pattern > "$previous.pattern"
        cat /proc/sys/kernel/core_pipe_limit > "$previous.limit" ;;
    esac
    echo "$limit" > /proc/sys/kernel/core_pipe_limit
    echo "$pattern" > /proc/sys/kernel/core_pattern
    echo "corepipe: forward mode: kernel.core_pattern = $pattern; serving the forwarder in this pod"
    start_shipper || true
    # SIGTERM: the kernel's settings first, then the server finishes the crashes it has taken.
    trap 'restore_kernel; kill -TERM "$server" ${shipper:-} 2>/dev/null || true' TERM INT
    wait "$server" || true
    wait "$server" 2>/dev/null || true
    restore_kernel
    kill -TERM ${shipper:-} 2>/dev/null || true
    exit 0
fi

if [ "$mode" = socket ]; then
    store="${COREPIPE_STORE:-/var/lib/corepipe}"   # a hostPath at the same path
    mkdir -p "$(dirname "$pod_config")"
    printf 'store = "%s"\n' "$store" > "$pod_config"
    echo "corepipe: socket mode: serving /run/corepipe/coredump.socket in this pod"
    serve="$python -I -m corepipe serve --config $pod_config \
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
