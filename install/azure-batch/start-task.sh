#!/usr/bin/env bash
# Azure Batch pool start task: install corepipe on the node with its store in the node's shared
# directory. Run it elevated (autoUser, scope pool, elevationLevel admin); see README.md here.
# Extra arguments go to `corepipe install` (e.g. --force to take over from another handler).
# Shipping (README.md here, "Shipping the pool's crashes"): with AZURE_STORAGE_ACCOUNT_URL set in the start
# task's environment, crashes go to the container named after the pool (COREPIPE_SHIP_TO overrides), as the
# pool's managed identity (AZURE_CLIENT_ID), each node under its node id.
set -euo pipefail
src="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
shared="${AZ_BATCH_NODE_SHARED_DIR:?AZ_BATCH_NODE_SHARED_DIR is not set: run this as an Azure Batch start task}"
if [ -n "${AZURE_STORAGE_ACCOUNT_URL:-}" ] && [ -z "${COREPIPE_SHIP_TO:-}" ]; then
    # A container name: 3-63 of [a-z0-9-], no "--"; from the pool id.
    container="$(printf '%s' "${AZ_BATCH_POOL_ID:?}" | LC_ALL=C tr 'A-Z' 'a-z' | LC_ALL=C tr -c 'a-z0-9-' '-' | tr -s '-' | cut -c1-63)"
    export COREPIPE_SHIP_TO="az://${container}/crashes"
fi
export COREPIPE_SHIP_NODE="${COREPIPE_SHIP_NODE:-${AZ_BATCH_NODE_ID:-$(hostname -s)}}"
exec bash "$src/install/install.sh" --store "$shared/corepipe" "$@"
