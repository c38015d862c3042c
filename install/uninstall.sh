#!/usr/bin/env bash
# Undoes install/install.sh: stops and removes its systemd units, runs `corepipe uninstall` (arguments pass
# through, e.g. --purge), removes the other files install.sh wrote outside the virtualenv (bash completion, man
# pages: listed in the virtualenv's share/corepipe/files), then the virtualenv. Same COREPIPE_PREFIX /
# COREPIPE_CONFIG overrides as install.sh.
set -euo pipefail
prefix="${COREPIPE_PREFIX:-/opt/corepipe}"
config="${COREPIPE_CONFIG:-/etc/corepipe/config.toml}"
if [ "$(id -u)" != 0 ]; then  # as another user, run again through sudo
    command -v sudo >/dev/null || { echo "uninstall.sh: error: run as root: bash install/uninstall.sh" >&2; exit 1; }
    exec sudo COREPIPE_PREFIX="$prefix" COREPIPE_CONFIG="$config" bash "${BASH_SOURCE[0]}" "$@"
fi
[ -x "$prefix/bin/python" ] || { echo "uninstall.sh: error: no corepipe virtualenv at $prefix" >&2; exit 1; }
list="$prefix/share/corepipe/files"
if [ -f "$list" ]; then
    mapfile -t files < "$list"
else  # installed by an install.sh that kept no list: its units were in systemd's directory
    files=()
    for name in corepipe.socket corepipe-forward.socket corepipe.service corepipe-prune.timer corepipe-prune.service corepipe-ship.service; do
        [ -f "/etc/systemd/system/$name" ] && files+=("/etc/systemd/system/$name")
    done
fi
# Units first: in socket mode the server hands the kernel back to the pipe handler when it stops.
systemd=""
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemd=yes
fi
for file in ${files[@]+"${files[@]}"}; do
    case "$file" in
        /etc/systemd/system/*.socket | /etc/systemd/system/*.service | /etc/systemd/system/*.timer)
            [ -z "$systemd" ] || systemctl disable --now "$(basename "$file")" >/dev/null 2>&1 || true ;;
    esac
done
"$prefix/bin/python" -I -m corepipe uninstall --config "$config" "$@"
reload=""
for file in ${files[@]+"${files[@]}"}; do
    [ -e "$file" ] || continue
    rm -f "$file"
    echo "uninstall.sh: removed $file"
    case "$file" in /etc/systemd/system/*) reload=yes ;; esac
done
[ -z "$systemd" ] || [ -z "$reload" ] || systemctl daemon-reload 2>/dev/null || true
rm -rf "$prefix"
echo "uninstall.sh: removed $prefix"
