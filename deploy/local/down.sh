#!/usr/bin/env bash
# Stops the local PostgreSQL and broker started by up.sh (their data stays in .data/local).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

DATA="$PGFANOUT_ROOT/.data/local"
[ -f "$DATA/env" ] || { log "nothing to stop"; exit 0; }
# shellcheck disable=SC1091
source "$DATA/env"
broker_stop "$DATA/broker"
pg_stop "$PGFANOUT_LOCAL_PG_DIR"
log "local services stopped"
