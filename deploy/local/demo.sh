#!/usr/bin/env bash
# Quick-start command 1: installs what is missing, starts PostgreSQL and the broker,
# builds pgfanout and runs the demo (executor, capture and three devices on a sample
# workload of 10,000 instructions), then verifies every device against PostgreSQL.
# Extra arguments go to `pgfanout demo` (see `pgfanout demo --help`).
# PGFANOUT_KEEP=1 leaves the services running afterwards.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

"$PGFANOUT_ROOT/deploy/local/up.sh"
# shellcheck disable=SC1091
source "$PGFANOUT_ROOT/.data/local/env"
if [ "${PGFANOUT_KEEP:-0}" != 1 ]; then
    trap '"$PGFANOUT_ROOT/deploy/local/down.sh"' EXIT
fi
log "building pgfanout"
(cd "$PGFANOUT_ROOT" && cargo build --release --quiet)
cd "$PGFANOUT_ROOT"
./target/release/pgfanout demo --data-dir .data/demo "$@"
