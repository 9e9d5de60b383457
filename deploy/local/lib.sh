# Shared functions of the local scripts: install what the pipeline needs, start and stop
# PostgreSQL and the Kafka-protocol broker on free ports. Sourced, not run.
# shellcheck shell=bash

PGFANOUT_BROKER_VERSION=0.8.1
PGFANOUT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}"
export PATH="$CARGO_HOME/bin:$PATH"

log() { printf '[pgfanout] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
    local missing=()
    for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
}

pg_bindir() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        [ -x "$d/initdb" ] && { echo "$d"; return 0; }
    done
    return 1
}

# Installs the C toolchain pieces, PostgreSQL and the broker when they are missing.
install_prerequisites() {
    command -v cargo >/dev/null || die "cargo not found: install a Rust toolchain (rustup) first"
    command -v cc >/dev/null && command -v make >/dev/null || apt_install build-essential
    # OpenSSL: TLS to PostgreSQL and Kafka (headers to build, the CLI for test certificates).
    apt_install libssl-dev pkg-config openssl
    command -v python3 >/dev/null || apt_install python3
    install_python_example_deps
    install_service_prerequisites
}

# PostgreSQL and the broker: all that starting the local services needs (cargo only to
# build the broker when it is not installed yet).
install_service_prerequisites() {
    pg_bindir >/dev/null || apt_install postgresql
    pg_bindir >/dev/null || die "PostgreSQL server binaries not found after installing the postgresql package"
    install_broker
}

# The Python packages of examples/python (its test runs the example producer), installed
# with pip when they do not import.
install_python_example_deps() {
    python3 -c 'import confluent_kafka, fastavro' 2>/dev/null && return 0
    python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
    log "installing the Python example's packages (examples/python/requirements.txt)"
    python3 -m pip install --quiet -r "$PGFANOUT_ROOT/examples/python/requirements.txt" \
        || die "pip could not install examples/python/requirements.txt"
    python3 -c 'import confluent_kafka, fastavro' || die "confluent_kafka and fastavro do not import after pip install"
}

# The local Kafka-protocol broker: Nisshi, built once into $CARGO_HOME/bin (about 11
# minutes on 2 cores; skipped when the right version is there). Nisshi needs rustc >= 1.96,
# which the nightly toolchain provides; without nightly, Tansu 0.6.0 builds on stable.
# cargo-fuzz for the nightly toolchain, into $CARGO_HOME/bin once.
install_fuzzer() {
    rustup toolchain list 2>/dev/null | grep -q '^nightly' || die "the nightly toolchain is needed for fuzzing (rustup toolchain install nightly)"
    command -v cargo-fuzz >/dev/null && return 0
    log "installing cargo-fuzz (once)"
    cargo install cargo-fuzz --locked --quiet || die "cargo install cargo-fuzz failed"
}

install_broker() {
    if command -v nisshi >/dev/null && nisshi --version 2>/dev/null | grep -q "$PGFANOUT_BROKER_VERSION"; then
        BROKER=nisshi; return 0
    fi
    if command -v tansu >/dev/null && ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
        BROKER=tansu; return 0
    fi
    command -v cargo >/dev/null || die "the broker is not installed, and building it needs cargo (install a Rust toolchain with rustup)"
    if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
        log "building the Kafka-protocol broker nisshi $PGFANOUT_BROKER_VERSION (once; about 11 minutes)"
        cargo +nightly install "nisshi@$PGFANOUT_BROKER_VERSION" --locked --quiet
        BROKER=nisshi
    else
        if ! command -v tansu >/dev/null; then
            log "no nightly toolchain: building the Kafka-protocol broker tansu 0.6.0 (once; about 12 minutes)"
            cargo install tansu@0.6.0 --locked --quiet --features libsql,dynostore
        fi
        BROKER=tansu
    fi
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Runs a command as the owner of PostgreSQL's data (user postgres when we are root).
as_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# pg_start DATA_DIR PORT [extra postgresql.conf lines...]
pg_start() {
    local dir=$1 port=$2; shift 2
    local bin; bin=$(pg_bindir)
    if [ ! -s "$dir/PG_VERSION" ]; then
        mkdir -p "$dir"
        [ "$(id -u)" = 0 ] && chown postgres: "$dir"
        chmod 700 "$dir"
        as_pg "$bin/initdb" -D "$dir" -U postgres -A trust -E UTF8 --locale=C.UTF-8 >/dev/null \
            || as_pg "$bin/initdb" -D "$dir" -U postgres -A trust -E UTF8 --locale=C >/dev/null
        {
            echo "listen_addresses = '127.0.0.1'"
            echo "unix_socket_directories = ''"
            echo "wal_level = logical"
            echo "max_replication_slots = 64"
            echo "max_wal_senders = 64"
            echo "max_connections = 300"
            echo "wal_sender_timeout = 60s"
            for line in "$@"; do echo "$line"; done
        } | as_pg tee -a "$dir/postgresql.conf" >/dev/null
    fi
    as_pg "$bin/pg_ctl" -D "$dir" -o "-p $port" -l "$dir/server.log" -w -t 60 start >/dev/null \
        || { cat "$dir/server.log" >&2; die "PostgreSQL did not start (log above)"; }
}

pg_stop() {
    local dir=$1
    [ -s "$dir/postmaster.pid" ] || return 0
    as_pg "$(pg_bindir)/pg_ctl" -D "$dir" -m fast -w -t 60 stop >/dev/null || true
}

# A folder PostgreSQL (user postgres) can use: DIR itself when every parent is searchable
# by that user, otherwise a folder under /var/tmp named after DIR.
pg_usable_dir() {
    local dir=$1
    if [ "$(id -u)" != 0 ]; then echo "$dir"; return; fi
    mkdir -p "$(dirname "$dir")"
    if runuser -u postgres -- test -x "$(dirname "$dir")"; then
        echo "$dir"
    else
        echo "/var/tmp/pgfanout-$(echo "$dir" | cksum | cut -d' ' -f1)/$(basename "$dir")"
    fi
}

# broker_start DIR PORT ENGINE(memory|sqlite): starts the broker in the background,
# writes its pid to DIR/broker.pid and waits until it answers.
broker_start() {
    local dir=$1 port=$2 engine=$3 storage
    mkdir -p "$dir"
    # Tansu's memory engine loses records on resume and seek: use its SQLite engine.
    [ "$BROKER" = tansu ] && engine=sqlite
    case $engine in
        memory) storage="memory://$BROKER/" ;;
        sqlite) storage="sqlite://$BROKER.db" ;;
        *) die "unknown broker engine $engine" ;;
    esac
    local extra=()
    [ "$BROKER" = nisshi ] && extra=(--group-initial-rebalance-delay=0s)
    # The broker reads a .env in its working directory and resolves sqlite paths from it.
    (cd "$dir" && RUST_LOG=${BROKER_LOG:-warn} exec "$BROKER" broker \
        --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
        --storage-engine "$storage" "${extra[@]}" >>"$dir/broker.log" 2>&1) &
    echo $! >"$dir/broker.pid"
    for _ in $(seq 1 100); do
        "$BROKER" topic list --broker "tcp://127.0.0.1:$port" >/dev/null 2>&1 && return 0
        kill -0 "$(cat "$dir/broker.pid")" 2>/dev/null || { cat "$dir/broker.log" >&2; die "the broker exited (log above)"; }
        sleep 0.1
    done
    die "the broker did not answer on port $port within 10 s"
}

broker_stop() {
    local dir=$1 pid
    [ -s "$dir/broker.pid" ] || return 0
    pid=$(cat "$dir/broker.pid")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/broker.pid"
}

# Client settings for the local broker: it polls its storage instead of waking a fetch,
# so consumers ask often; every fetch walks all batches stored in a partition, so
# producers keep one request in flight and send fewer, larger batches; short sessions
# make failover quick.
# shellcheck disable=SC2034 # used by the scripts that source this file
LOCAL_KAFKA_PROPERTIES="fetch.wait.max.ms=20,max.in.flight.requests.per.connection=1,session.timeout.ms=6000,heartbeat.interval.ms=1000"
# Devices on the broker's SQLite storage (up.sh), which serves about 500 requests a second
# on one core, writes slowest: a device fetches at most twice a second unless 64 KB wait,
# and acknowledges at most once a second. With the settings above, 64 devices took the
# whole core with fetches and acknowledgements, and the demo's results trickled in
# (4,000 of 10,000 in 300 s); with these, `pgfanout demo --devices 64` ends in about a
# minute (BENCHMARKS.md, "The fleet at 3, 16 and 64 devices").
# shellcheck disable=SC2034 # used by the scripts that source this file
LOCAL_SQLITE_DEVICE_KAFKA_PROPERTIES="fetch.wait.max.ms=500,fetch.min.bytes=65536"
# shellcheck disable=SC2034
LOCAL_SQLITE_ACK_INTERVAL_MS=1000
