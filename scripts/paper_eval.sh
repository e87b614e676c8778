#!/usr/bin/env bash
# The paper protocol on the default model with the shipped pack (README "Results").
# Phase 1: every method at alpha 0.5 (acd: the paper's ungated ACD; acd-gate: ACD routed by
# the pack's safety gate, so the pack must have one); phase 2: the acd alpha sweep, reusing
# phase 1's records (base, the method a request the gate passes decodes with, and acd-gate's
# gate scores feed the report's threshold sweep at every alpha; plain and base are not
# generated again). Both phases resume: rerun this script after an interruption.
set -euo pipefail
ACD=${ACD:-.venv/bin/acd}
BENCH=advbench,malicious_instruct,harmfulqa,dangerousqa,beavertails,xstest,alpaca_eval,truthfulqa
COMMON=(--benchmarks "$BENCH" --limit 100 --max-new-tokens 48 --batch-size 8 --plausibility 0.1)
"$ACD" eval --methods plain,base,nid,oid,acd,acd-gate --alphas 0.5 --out runs/paper "${COMMON[@]}"
mkdir -p runs/paper-sweep
if [ ! -s runs/paper-sweep/records.jsonl ]; then
  cp runs/paper/records.jsonl runs/paper-sweep/records.jsonl
fi
"$ACD" eval --methods plain,base,acd,acd-gate --alphas 0.25,0.5,0.75 --out runs/paper-sweep "${COMMON[@]}"
