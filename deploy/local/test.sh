#!/usr/bin/env bash
# Quick-start command 2: installs what is missing, starts a throwaway PostgreSQL and
# broker (in-memory storage) on free ports, validates the deployment files
# (deploy/validate.sh), runs the whole test suite against them, and stops them again.
# Extra arguments go to `cargo test`.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

install_prerequisites
# The observability test runs a real Prometheus and promtool.
command -v prometheus >/dev/null && command -v promtool >/dev/null || apt_install prometheus
# The fleet test runs devices with shifted clocks.
command -v faketime >/dev/null || apt_install faketime
WORK=$(mktemp -d /tmp/pgfanout-test.XXXXXX)
# deploy/validate.sh installs its validators into a virtual environment, which Debian's
# python3 can make only with python3-venv.
[ -x "$PGFANOUT_ROOT/.data/validate-venv/bin/python" ] || python3 -m venv "$WORK/venv-probe" >/dev/null 2>&1 \
    || apt_install python3-venv
chmod 755 "$WORK"
PG_DIR="$WORK/pg"
SOCKETS="$WORK/sockets"
mkdir -p "$SOCKETS" && chmod 1777 "$SOCKETS"
cleanup() {
    broker_stop "$WORK/broker"
    pg_stop "$PG_DIR"
    rm -rf "$WORK"
}
trap cleanup EXIT

PG_PORT=$(free_port)
BROKER_PORT=$(free_port)
# TLS: a throwaway CA and a server certificate for localhost and 127.0.0.1 (the TLS tests
# verify it), and a second CA the server's certificate does not chain to.
TLS="$WORK/tls"
mkdir -p "$TLS"
(
    cd "$TLS"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=pgfanout test CA" -keyout ca.key -out ca.crt 2>/dev/null
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=another CA" -keyout other-ca.key -out other-ca.crt 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >san.cnf
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile san.cnf -out server.crt 2>/dev/null
    chmod 600 server.key
    [ "$(id -u)" = 0 ] && chown postgres: server.key server.crt
) || die "openssl could not make the test certificates"
# Tests create and drop many databases: durability is not what they measure.
pg_start "$PG_DIR" "$PG_PORT" "fsync = off" "full_page_writes = off" "unix_socket_directories = '$SOCKETS'" \
    "ssl = on" "ssl_cert_file = '$TLS/server.crt'" "ssl_key_file = '$TLS/server.key'"
# Roles for the authentication tests of the replication client, one per method.
PSQL=("$(pg_bindir)/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres)
as_pg "${PSQL[@]}" <<'SQL'
SET password_encryption = 'md5';
CREATE ROLE pgf_md5 LOGIN REPLICATION PASSWORD 'md5-secret';
SET password_encryption = 'scram-sha-256';
CREATE ROLE pgf_scram LOGIN REPLICATION PASSWORD 'scram-secret';
CREATE ROLE pgf_password LOGIN REPLICATION PASSWORD 'plain-secret';
CREATE ROLE pgf_tls LOGIN REPLICATION PASSWORD 'tls-secret';
SQL
{
    echo "hostssl all pgf_tls 127.0.0.1/32 scram-sha-256"
    echo "host all pgf_tls 127.0.0.1/32 reject"
    echo "host all pgf_md5 127.0.0.1/32 md5"
    echo "host all pgf_scram 127.0.0.1/32 scram-sha-256"
    echo "host all pgf_password 127.0.0.1/32 password"
    cat "$PG_DIR/pg_hba.conf"
} | as_pg tee "$PG_DIR/pg_hba.conf.new" >/dev/null
as_pg mv "$PG_DIR/pg_hba.conf.new" "$PG_DIR/pg_hba.conf"
as_pg "$(pg_bindir)/pg_ctl" -D "$PG_DIR" reload >/dev/null
broker_start "$WORK/broker" "$BROKER_PORT" memory
log "PostgreSQL on 127.0.0.1:$PG_PORT, $BROKER broker on 127.0.0.1:$BROKER_PORT"

export PGFANOUT_TEST_POSTGRES="host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres"
export PGFANOUT_TEST_PG_MD5="host=127.0.0.1 port=$PG_PORT user=pgf_md5 password=md5-secret dbname=postgres"
export PGFANOUT_TEST_PG_SCRAM="postgresql://pgf_scram:scram-secret@127.0.0.1:$PG_PORT/postgres"
export PGFANOUT_TEST_PG_PASSWORD="host=127.0.0.1 port=$PG_PORT user=pgf_password password=plain-secret dbname=postgres"
export PGFANOUT_TEST_PG_TLS="host=localhost port=$PG_PORT user=pgf_tls password=tls-secret dbname=postgres"
export PGFANOUT_TEST_TLS_DIR="$TLS"
export PGFANOUT_TEST_PG_UNIX="host=$SOCKETS port=$PG_PORT user=postgres dbname=postgres"
export PGFANOUT_TEST_BROKERS="127.0.0.1:$BROKER_PORT"
export PGFANOUT_TEST_KAFKA_PROPERTIES="$LOCAL_KAFKA_PROPERTIES"
PGFANOUT_TEST_BROKER_BIN="$(command -v "$BROKER")"
export PGFANOUT_TEST_BROKER_BIN
cd "$PGFANOUT_ROOT"
VALIDATE_POSTGRES="$PGFANOUT_TEST_POSTGRES" ./deploy/validate.sh
# Structure (file sizes, size lints, import cycles) and lints, only for the whole suite.
if [ $# -eq 0 ]; then
    ./.ci/check-structure --self-test
    ./.ci/check-structure
    cargo clippy --all-targets -- -D warnings -W clippy::too_many_lines
fi
cargo test --quiet "$@"
# The README's manual path, run as written (only for the whole suite).
if [ $# -eq 0 ]; then
    ./deploy/local/readme-manual.sh
fi
# Bounded fuzzing of the decoders of what arrives from outside (pgoutput, instructions,
# deltas), with the nightly toolchain; only for the whole suite, not a filtered run.
if [ $# -eq 0 ]; then
    install_fuzzer
    for target in pgoutput instruction delta; do
        log "fuzzing $target for ${PGFANOUT_FUZZ_SECONDS:-60} s"
        if ! cargo +nightly fuzz run --sanitizer none "$target" -- -max_total_time="${PGFANOUT_FUZZ_SECONDS:-60}" \
            >"$WORK/fuzz-$target.log" 2>&1; then
            tail -n 40 "$WORK/fuzz-$target.log" >&2
            die "fuzz target $target failed (the input is under fuzz/artifacts/$target)"
        fi
        grep -E '^Done' "$WORK/fuzz-$target.log" >&2 || true
    done
fi
