#!/usr/bin/env bash
# Undoes install/install.sh: `corepipe uninstall` (arguments pass through, e.g. --purge), then removes
# the virtualenv. Same COREPIPE_PREFIX / COREPIPE_CONFIG overrides as install.sh.
set -euo pipefail
prefix="${COREPIPE_PREFIX:-/opt/corepipe}"
config="${COREPIPE_CONFIG:-/etc/corepipe/config.toml}"
if [ "$(id -u)" != 0 ]; then  # as another user, run again through sudo
    command -v sudo >/dev/null || { echo "uninstall.sh: error: run as root: bash install/uninstall.sh" >&2; exit 1; }
    exec sudo bash "${BASH_SOURCE[0]}" "$@"
fi
[ -x "$prefix/bin/python" ] || { echo "uninstall.sh: error: no corepipe virtualenv at $prefix" >&2; exit 1; }
units=/etc/systemd/system
if [ -f "$units/corepipe.service" ]; then  # socket mode: the server hands the kernel back to the pipe handler
    systemctl disable --now corepipe.service corepipe.socket corepipe-forward.socket >/dev/null 2>&1 || true
    rm -f "$units/corepipe.service" "$units/corepipe.socket" "$units/corepipe-forward.socket"
    systemctl daemon-reload 2>/dev/null || true
    echo "uninstall.sh: removed corepipe.service and its sockets"
fi
"$prefix/bin/python" -I -m corepipe uninstall --config "$config" "$@"
if [ -f "$units/corepipe-prune.timer" ]; then
    systemctl disable --now corepipe-prune.timer >/dev/null 2>&1 || true
    rm -f "$units/corepipe-prune.timer" "$units/corepipe-prune.service"
    systemctl daemon-reload 2>/dev/null || true
    echo "uninstall.sh: removed corepipe-prune.timer"
fi
rm -rf "$prefix"
echo "uninstall.sh: removed $prefix"
