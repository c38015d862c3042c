#!/usr/bin/env bash
# Azure Batch pool start task: install corepipe on the node with its store in the node's shared
# directory. Run it elevated (autoUser, scope pool, elevationLevel admin); see README.md here.
# Extra arguments go to `corepipe install` (e.g. --force to take over from another handler).
set -euo pipefail
src="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
shared="${AZ_BATCH_NODE_SHARED_DIR:?AZ_BATCH_NODE_SHARED_DIR is not set: run this as an Azure Batch start task}"
exec bash "$src/install/install.sh" --store "$shared/corepipe" "$@"
