#!/usr/bin/env bash
# Runs the README's "From nothing, by hand" section exactly as written, in a copy of the
# working tree (its own .data/local: fresh PostgreSQL and broker; `target` shared with this
# tree), and checks that it ends with both devices equal to PostgreSQL.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

COPY=$(mktemp -d /tmp/pgfanout-manual.XXXXXX)
chmod 755 "$COPY"
cleanup() {
    # Components a failed run left behind: they run in the copy's folder.
    for pid in $(pgrep -x pgfanout || true); do
        if [ "$(readlink "/proc/$pid/cwd")" = "$COPY" ]; then kill "$pid" 2>/dev/null || true; fi
    done
    (cd "$COPY" && ./deploy/local/down.sh >/dev/null 2>&1) || true
    rm -rf "$COPY"
}
trap cleanup EXIT
tar -C "$PGFANOUT_ROOT" --exclude=./target --exclude=./.data --exclude=./.git -cf - . | tar -C "$COPY" -xf -
mkdir -p "$PGFANOUT_ROOT/target"
ln -s "$PGFANOUT_ROOT/target" "$COPY/target"
sed -n '/<!-- manual path: begin -->/,/<!-- manual path: end -->/p' "$PGFANOUT_ROOT/README.md" \
    | sed -e '1,/^```sh$/d' -e '/^```$/,$d' >"$COPY/manual.sh"
[ -s "$COPY/manual.sh" ] || die "README.md has no manual path section"
log "running the README's manual path ($(wc -l <"$COPY/manual.sh") lines) in $COPY"
(cd "$COPY" && bash -euo pipefail manual.sh) 2>&1 | tee "$COPY/manual.out"
grep -q '^applied on the fleet (2 devices)' "$COPY/manual.out" \
    || die "the README's manual path did not end with the instruction confirmed on both devices"
grep -q '^verified: 2 of 2 devices match postgres (1 rows)' "$COPY/manual.out" \
    || die "the README's manual path did not end with both devices equal to PostgreSQL"
log "the README's manual path works as written"
