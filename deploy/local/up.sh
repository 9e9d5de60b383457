#!/usr/bin/env bash
# Starts PostgreSQL and the Kafka-protocol broker for local use, with data kept in
# .data/local between runs, and writes .data/local/env with the PGFANOUT_* settings that
# point the pipeline at them (`source .data/local/env`).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

# Only what starting the services needs: no cargo when the broker is already installed.
install_service_prerequisites
DATA="$PGFANOUT_ROOT/.data/local"
mkdir -p "$DATA"
PG_DIR=$(pg_usable_dir "$DATA/pg")
ENV_FILE="$DATA/env"

if [ -f "$ENV_FILE" ]; then
    # shellcheck disable=SC1090
    source "$ENV_FILE"
fi
PG_PORT=${PGFANOUT_LOCAL_PG_PORT:-$(free_port)}
BROKER_PORT=${PGFANOUT_LOCAL_BROKER_PORT:-$(free_port)}

# Written before anything starts, so that down.sh finds what a failed start left running.
cat >"$ENV_FILE" <<ENV
export PGFANOUT_LOCAL_PG_PORT=$PG_PORT
export PGFANOUT_LOCAL_BROKER_PORT=$BROKER_PORT
export PGFANOUT_LOCAL_PG_DIR=$PG_DIR
export PGFANOUT_POSTGRES="host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres"
export PGFANOUT_BROKERS=127.0.0.1:$BROKER_PORT
export PGFANOUT_KAFKA_PROPERTIES=$LOCAL_KAFKA_PROPERTIES
export PGFANOUT_DEVICE_KAFKA_PROPERTIES=$LOCAL_SQLITE_DEVICE_KAFKA_PROPERTIES
export PGFANOUT_ACK_INTERVAL_MS=$LOCAL_SQLITE_ACK_INTERVAL_MS
export PGFANOUT_TOPIC_PARTITIONS=3
ENV

if [ -s "$PG_DIR/postmaster.pid" ] && as_pg "$(pg_bindir)/pg_ctl" -D "$PG_DIR" status >/dev/null 2>&1; then
    log "PostgreSQL already running on port $PG_PORT"
else
    pg_start "$PG_DIR" "$PG_PORT"
    log "PostgreSQL running on 127.0.0.1:$PG_PORT (data in $PG_DIR)"
fi
if [ -s "$DATA/broker/broker.pid" ] && kill -0 "$(cat "$DATA/broker/broker.pid")" 2>/dev/null; then
    log "broker already running on port $BROKER_PORT"
else
    broker_start "$DATA/broker" "$BROKER_PORT" sqlite
    log "$BROKER broker running on 127.0.0.1:$BROKER_PORT (data in $DATA/broker)"
fi
log "settings in $ENV_FILE (source it)"
