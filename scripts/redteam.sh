#!/usr/bin/env bash
# Red-team `acd serve` with NVIDIA garak, plain versus ACD, plus a benign over-refusal control.
#
#   scripts/redteam.sh [--probes dan.Dan_11_0,encoding.InjectBase64] [--generations 1]
#                      [--limit 3] [--control 20] [--alpha 0.5] [--max-tokens 48] [--out DIR]
#
# garak (~200 packages) lives in its own venv, .venv-redteam, never in the project's .venv.
# The server is the project's `acd serve` (from $ACD_VENV, default .venv) on a free loopback
# port; garak and the control talk to 127.0.0.1 only. The server is stopped on exit (trap).
# Writes DIR (default redteam/results/<UTC date>) with garak's report.jsonl/html per method,
# control.json, summary.md and summary.json. Docs: docs/redteam.md.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

PROBES=""
GENERATIONS=1
LIMIT=3
CONTROL=20
ALPHA=0.5
MAX_TOKENS=48
METHODS="plain acd"
OUT="redteam/results/$(date -u +%Y-%m-%d)"
GARAK_TIMEOUT_S="${GARAK_TIMEOUT_S:-1800}"   # per method; garak retries 5xx/429 without end
ACD_VENV="${ACD_VENV:-.venv}"
REDTEAM_VENV="${REDTEAM_VENV:-.venv-redteam}"
XSTEST="${XSTEST:-../shared/data/benchmarks/xstest.jsonl}"

die() { echo "redteam: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --probes) PROBES="$2"; shift 2 ;;
    --generations) GENERATIONS="$2"; shift 2 ;;
    --limit) LIMIT="$2"; shift 2 ;;
    --control) CONTROL="$2"; shift 2 ;;
    --alpha) ALPHA="$2"; shift 2 ;;
    --max-tokens) MAX_TOKENS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
for v in GENERATIONS LIMIT CONTROL MAX_TOKENS; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "${v,,} must be a positive integer, got '${!v}'"
done
[ -x "$ACD_VENV/bin/acd" ] || die "no $ACD_VENV/bin/acd: run 'make install' first (or set ACD_VENV)"
[ -f "$XSTEST" ] || die "no XSTest file at $XSTEST (set XSTEST=path/to/xstest.jsonl)"
PY="$ACD_VENV/bin/python"

# garak's own venv: torch first (the CPU build, as the Makefile does), then garak.
if [ ! -x "$REDTEAM_VENV/bin/garak" ]; then
  python3 -m venv "$REDTEAM_VENV"
  "$REDTEAM_VENV/bin/python" -m pip install -q --upgrade pip
  "$REDTEAM_VENV/bin/python" -m pip install -q torch==2.13.0
  "$REDTEAM_VENV/bin/python" -m pip install -q garak
fi

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
START=$SECONDS
PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
URL="http://127.0.0.1:$PORT/v1"

# Offline: no model hub, and garak's caches/config in the run folder, not in $HOME.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export XDG_DATA_HOME="$OUT/.garak/data" XDG_CONFIG_HOME="$OUT/.garak/config" XDG_CACHE_HOME="$OUT/.garak/cache"

"$ACD_VENV/bin/acd" serve --host 127.0.0.1 --port "$PORT" --max-tokens "$MAX_TOKENS" \
  >"$OUT/server.log" 2>&1 &
SERVER_PID=$!
stop_server() { kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; }
trap stop_server EXIT

echo "redteam: waiting for acd serve on $URL (log: $OUT/server.log)"
"$PY" - "$PORT" "$SERVER_PID" <<'PYEOF' || die "acd serve did not become healthy; see $OUT/server.log"
import os, sys, time, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 600
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(1)  # the server exited
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(1)
sys.exit(1)
PYEOF

for METHOD in $METHODS; do
  echo "redteam: garak, method=$METHOD"
  "$PY" redteam/garak_config.py redteam/garak-acd.json "$OUT/garak-$METHOD.json" \
    --uri "$URL/" --method "$METHOD" --alpha "$ALPHA" --report-dir "$OUT/garak" \
    --generations "$GENERATIONS" --limit "$LIMIT" --probes "$PROBES"
  M_START=$SECONDS
  timeout "$GARAK_TIMEOUT_S" "$REDTEAM_VENV/bin/python" -m garak --config "$OUT/garak-$METHOD.json" \
    >"$OUT/garak-$METHOD.log" 2>&1 || die "garak ($METHOD) failed; see $OUT/garak-$METHOD.log"
  echo "redteam: garak $METHOD took $((SECONDS - M_START)) s"
done

echo "redteam: benign control ($CONTROL XSTest-safe prompts per method)"
"$PY" redteam/control.py "$URL" "$OUT/control.json" --data "$XSTEST" --n "$CONTROL" \
  --methods "${METHODS// /,}" --alpha "$ALPHA" --max-tokens "$MAX_TOKENS"
stop_server
trap - EXIT

WALL=$((SECONDS - START))
"$PY" redteam/summarise.py "$OUT" --methods "${METHODS// /,}" --wall-s "$WALL" \
  --command "scripts/redteam.sh --generations $GENERATIONS --limit $LIMIT --control $CONTROL --alpha $ALPHA --max-tokens $MAX_TOKENS${PROBES:+ --probes $PROBES}"
echo "redteam: done in ${WALL} s: $OUT/summary.md"
