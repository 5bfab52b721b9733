#!/usr/bin/env bash
# A CI gate: compile a model for a target, fail the job when it misses its accuracy or speed
# budget (or when a plugin pass breaks), keep the report and a Markdown summary either way.
#
#   gate.sh MODEL OUT_DIR            e.g. gate.sh reference build/ref-int8
#
# Environment: TARGET (cpu-int8), MAX_PPL_INCREASE (1%), MIN_SPEEDUP (1.2), EVAL_TEXT (the model's
# eval.txt when unset), PLUGIN (a plugin file) with PASSES (a pipeline naming its passes),
# BROKEN=1 (add the deliberately broken plugin next to this script after `fuse` in the target's
# pipeline: the job must fail).
set -euo pipefail
MODEL=$1
OUT=$2
HERE=$(cd "$(dirname "$0")" && pwd)
TARGET=${TARGET:-cpu-int8}
ARGS=(--target "$TARGET" -o "$OUT" --report "$OUT.report.json"
      --max-ppl-increase "${MAX_PPL_INCREASE:-1%}" --min-speedup "${MIN_SPEEDUP:-1.2}")
[[ -n "${EVAL_TEXT:-}" ]] && ARGS+=(--eval-text "$EVAL_TEXT")
[[ -n "${PLUGIN:-}" ]] && ARGS+=(--plugin "$PLUGIN")
PASSES=${PASSES:-}
if [[ "${BROKEN:-0}" == 1 ]]; then
  ARGS+=(--plugin "$HERE/broken_plugin.py")
  PIPELINE=$(llmopt targets --json | python -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]]["pipeline"])' "$TARGET")
  PASSES=${PIPELINE/fuse,/fuse,scale-first-weight,}
fi
[[ -n "$PASSES" ]] && ARGS+=(--passes "$PASSES")

status=0
llmopt compile "$MODEL" "${ARGS[@]}" || status=$?
if [[ $status -ne 0 ]]; then
  [[ -f "$OUT.report.json" ]] && echo "report (which gate or threshold was missed, by how much): $OUT.report.json" >&2
  echo "::error::llmopt compile failed (exit $status)" >&2
  exit "$status"
fi
llmopt report "$OUT" --markdown "$OUT.md"
echo "gate passed: $OUT ($(python -c "import json,sys; r=json.load(open(sys.argv[1])); print(', '.join(g['text'] for g in r['gates']))" "$OUT.report.json"))"
