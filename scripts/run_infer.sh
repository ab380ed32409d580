#!/usr/bin/env bash
# Generate text from a mindport or HF model directory, on one process or tensor-parallel.
#
#   run_infer.sh MODEL_DIR "PROMPT" [MODEL_PARALLEL] [extra `mindport generate` options...]
#
# MODEL_PARALLEL 1 (default) runs `mindport generate` directly; N > 1 launches N processes with
# msrun (scripts/msrun_launcher.sh: port 8128 or a free one, logs in output/infer_log), each
# holding 1/N of every layer; rank 0 prints the text. Either way the exit code is generate's.
# Example (one Atlas 800T A2 node, TeleChat2-115B in bf16):
#   scripts/run_infer.sh /data/TeleChat2-115B "你好" 8 --dtype bfloat16 --chat --stream
set -euo pipefail
if (( $# < 2 )); then sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2; fi
MODEL=$1; PROMPT=$2; TP=${3:-1}; shift $(( $# >= 3 ? 3 : 2 ))
[[ $TP =~ ^[0-9]+$ && $TP -ge 1 ]] || { echo "run_infer.sh: error: MODEL_PARALLEL = '$TP': expected a positive integer" >&2; exit 2; }
if (( TP == 1 )); then
  exec mindport generate --load "$MODEL" --prompt "$PROMPT" "$@"
fi
here=$(cd "$(dirname "$0")" && pwd)
printf -v quoted '%q ' --load "$MODEL" --prompt "$PROMPT" --model-parallel "$TP" "$@"
exec "$here/msrun_launcher.sh" "mindport generate $quoted" "$TP" 8128 output/infer_log True 600
