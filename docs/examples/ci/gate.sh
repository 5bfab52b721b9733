#!/usr/bin/env bash
# A CI gate: compile a model for a target, fail the job when it misses its accuracy or speed
# budget (or when a plugin pass breaks), keep the report and a Markdown summary either way.
#
#   gate.sh MODEL OUT_DIR            e.g. gate.sh reference build/ref-int8
#
# Environment: TARGET (cpu-int8), MAX_PPL_INCREASE (1%), MIN_SPEEDUP (1.2), EVAL_TEXT (the model's
# eval.txt when unset), PLUGIN (a plugin file whose passes to add), BROKEN=1 (add the deliberately
# broken plugin next to this script: the job must fail).
set -euo pipefail
MODEL=$1
OUT=$2
HERE=$(cd "$(dirname "$0")" && pwd)
TARGET=${TARGET:-cpu-int8}
PIPELINE="fold,cleanup,fuse,kv-cache,quantize-dynamic,cleanup"
ARGS=(--target "$TARGET" -o "$OUT" --report "$OUT.report.json"
      --max-ppl-increase "${MAX_PPL_INCREASE:-1%}" --min-speedup "${MIN_SPEEDUP:-1.2}")
[[ -n "${EVAL_TEXT:-}" ]] && ARGS+=(--eval-text "$EVAL_TEXT")
if [[ -n "${PLUGIN:-}" ]]; then ARGS+=(--plugin "$PLUGIN"); fi
if [[ "${BROKEN:-0}" == 1 ]]; then
  ARGS+=(--plugin "$HERE/broken_plugin.py")
  PIPELINE="fold,cleanup,fuse,scale-first-weight,kv-cache,quantize-dynamic,cleanup"
fi

status=0
llmopt compile "$MODEL" "${ARGS[@]}" --passes "$PIPELINE" || status=$?
if [[ $status -ne 0 ]]; then
  [[ -f "$OUT.report.json" ]] && echo "report (which gate or threshold was missed, by how much): $OUT.report.json" >&2
  echo "::error::llmopt compile failed (exit $status)" >&2
  exit "$status"
fi
llmopt report "$OUT" --markdown "$OUT.md"
echo "gate passed: $OUT ($(python -c "import json,sys; r=json.load(open(sys.argv[1])); print(', '.join(g['text'] for g in r['gates']))" "$OUT.report.json"))"
