#!/usr/bin/env bash
# Launch a mindport job on one or more nodes with msrun, in mindformers' positional forms.
#
#   msrun_launcher.sh "CMD"                                  8 workers on this node
#   msrun_launcher.sh "CMD" WORKER_NUM                       WORKER_NUM workers on this node
#   msrun_launcher.sh "CMD" WORKER_NUM MASTER_PORT LOG_DIR JOIN CLUSTER_TIME_OUT
#   msrun_launcher.sh "CMD" WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK LOG_DIR JOIN CLUSTER_TIME_OUT
#
# CMD is a Python script with its arguments ("scripts/run_train.py --config c.yaml") or a
# mindport command ("mindport train --config c.yaml"). The 9-argument form is run once on
# every node with the same WORKER_NUM (world size) and MASTER_ADDR/MASTER_PORT (node 0's
# address) and that node's NODE_RANK; LOCAL_WORKER is the workers on this node (8 on an
# Atlas 800T A2). The product data_parallel x pipeline_stage x context_parallel x
# model_parallel in the YAML must equal WORKER_NUM.
#
# JOIN True (the 1- and 2-argument forms: LOG_DIR output/msrun_log, port 8118) waits for this
# node's workers and returns the job's exit code; when a worker fails, its rank and the end of
# its log (LOG_DIR/worker_RANK.log) are printed. Ctrl-C or SIGTERM asks this node's workers to
# stop after their current step (mindport train saves a checkpoint) and returns 130 or 143; a
# second one kills the job. JOIN False returns once the processes started.
# A MASTER_PORT in use on this host is replaced by a free port in the single-node forms and
# fails at once in the 9-argument form.
set -euo pipefail

me=msrun_launcher.sh
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2; }

case $# in
  1) CMD=$1; WORKER_NUM=8; LOCAL_WORKER=8; MASTER_ADDR=127.0.0.1; MASTER_PORT=8118; NODE_RANK=0
     LOG_DIR=output/msrun_log; JOIN=True; CLUSTER_TIME_OUT=7200 ;;
  2) CMD=$1; WORKER_NUM=$2; LOCAL_WORKER=$2; MASTER_ADDR=127.0.0.1; MASTER_PORT=8118; NODE_RANK=0
     LOG_DIR=output/msrun_log; JOIN=True; CLUSTER_TIME_OUT=7200 ;;
  6) CMD=$1; WORKER_NUM=$2; LOCAL_WORKER=$2; MASTER_ADDR=127.0.0.1; MASTER_PORT=$3; NODE_RANK=0
     LOG_DIR=$4; JOIN=$5; CLUSTER_TIME_OUT=$6 ;;
  9) CMD=$1; WORKER_NUM=$2; LOCAL_WORKER=$3; MASTER_ADDR=$4; MASTER_PORT=$5; NODE_RANK=$6
     LOG_DIR=$7; JOIN=$8; CLUSTER_TIME_OUT=$9 ;;
  *) echo "$me: error: expected 1, 2, 6 or 9 arguments, got $#" >&2; usage ;;
esac

for name in WORKER_NUM LOCAL_WORKER MASTER_PORT NODE_RANK CLUSTER_TIME_OUT; do
  [[ ${!name} =~ ^[0-9]+$ ]] || { echo "$me: error: $name = '${!name}': expected an integer" >&2; exit 2; }
done
(( WORKER_NUM > 0 && LOCAL_WORKER > 0 )) || { echo "$me: error: WORKER_NUM = $WORKER_NUM, LOCAL_WORKER = $LOCAL_WORKER: expected positive counts" >&2; exit 2; }
(( LOCAL_WORKER <= WORKER_NUM )) || { echo "$me: error: LOCAL_WORKER = $LOCAL_WORKER exceeds WORKER_NUM = $WORKER_NUM" >&2; exit 2; }
case ${JOIN,,} in true) JOIN=True ;; false) JOIN=False ;; *) echo "$me: error: JOIN = '$JOIN': expected True or False" >&2; exit 2 ;; esac

eval "ARGS=($CMD)"  # CMD is a shell command line: honour its quoting ("--prompt 'two words'")
if [[ ${ARGS[0]} =~ ^python(3(\.[0-9]+)?)?$ ]]; then  # "python script.py ...": msrun adds the interpreter
  ARGS=("${ARGS[@]:1}")
fi
if [[ ${ARGS[0]:-} == mindport ]]; then  # msrun runs a Python script: use the CLI module's file
  ARGS[0]=$(python -c 'import mindport.cli as c; print(c.__file__)')
elif [[ ! -f ${ARGS[0]:-} ]]; then
  echo "$me: error: CMD = '$CMD': expected a Python script with its arguments or a mindport command" >&2
  exit 2
fi

# Can this host bind MASTER_ADDR:MASTER_PORT, as msrun's scheduler will (without SO_REUSEADDR: a
# port in TIME_WAIT after an earlier job stops it too)? "free", "in-use", or "elsewhere" (the
# address is another node's: its launcher checks).
port_state() {
  python - "$MASTER_ADDR" "$MASTER_PORT" <<'PY'
import errno, socket, sys
with socket.socket() as s:
    try:
        s.bind((sys.argv[1], int(sys.argv[2])))
        print("free")
    except OSError as err:
        print("in-use" if err.errno == errno.EADDRINUSE else "elsewhere")
PY
}

if [[ $(port_state) == in-use ]]; then
  if (( $# == 9 )); then
    echo "$me: error: MASTER_PORT = $MASTER_PORT: in use on $MASTER_ADDR (or in TIME_WAIT after an earlier job): expected a free port (the same on every node)" >&2
    exit 2
  fi
  port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  echo "$me: port $MASTER_PORT is in use; using $port" >&2
  MASTER_PORT=$port
fi

here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$LOG_DIR"
MSRUN=(msrun --worker_num="$WORKER_NUM" --local_worker_num="$LOCAL_WORKER" --master_addr="$MASTER_ADDR"
       --master_port="$MASTER_PORT" --node_rank="$NODE_RANK" --log_dir="$LOG_DIR" --join="$JOIN"
       --cluster_time_out="$CLUSTER_TIME_OUT" "$here/msrun_worker.py" "${ARGS[@]}")
if [[ $JOIN == False ]]; then
  exec "${MSRUN[@]}"
fi

# msrun runs in a session of its own, so that a terminal's Ctrl-C reaches only this script (msrun would
# SIGKILL the workers): SIGINT/SIGTERM here are passed to this node's workers as SIGTERM, and each
# finishes its step and saves (mindport train) before the job ends.
stop=0
forward() {
  stop=$1
  echo "$me: $2: asking this node's workers to stop after their current step (again to kill the job)" >&2
  trap 'kill -KILL -- -$msrun_pid 2>/dev/null; pkill -KILL -P "$msrun_pid" -f "$here/msrun_worker.py" 2>/dev/null; exit $stop' INT TERM
  pkill -TERM -P "$msrun_pid" -f "$here/msrun_worker.py" 2>/dev/null || true
}
trap 'forward 130 SIGINT' INT
trap 'forward 143 SIGTERM' TERM
setsid "${MSRUN[@]}" 2> "$LOG_DIR/msrun.log" &
msrun_pid=$!
status=0
while true; do  # wait returns early when a trapped signal arrives: wait again until msrun has ended
  wait "$msrun_pid" && status=0 || status=$?
  kill -0 "$msrun_pid" 2>/dev/null || break
done
if (( stop )); then
  echo "$me: stopped (workers' logs in $LOG_DIR)" >&2
  exit "$stop"
fi
(( status == 0 )) && exit 0

# The last lines of a log, without MindSpore's INFO/WARNING lines and msrun_worker.py's exit line.
log_tail() {
  { grep -v -e '^\[msrun_launcher\] exit code' -e '^\[WARNING\] ' -e '^\[INFO\] ' "$1" 2>/dev/null || true; } |
    tail -n "$2" | sed 's/^/  /' >&2
}

# msrun only says that the job failed: each worker's log ends with its exit code (msrun_worker.py)
first_rank=$(( LOCAL_WORKER == WORKER_NUM ? 0 : NODE_RANK * LOCAL_WORKER ))
failed=()  # "rank:code" of this node's workers that exited non-zero
silent=()  # ranks whose log has no exit line: the worker process itself was killed (kill -9, OOM killer)
for (( rank = first_rank; rank < first_rank + LOCAL_WORKER; rank++ )); do
  code=$(sed -n 's/^\[msrun_launcher\] exit code //p' "$LOG_DIR/worker_$rank.log" 2>/dev/null || true)
  if [[ -n $code && $code != 0 ]]; then failed+=("$rank:$code"); fi
  if [[ -z $code ]]; then silent+=("$rank"); fi
done
if (( ${#failed[@]} == 0 && ${#silent[@]} > 0 )); then
  rank=${silent[0]}
  echo "$me: worker $rank ended without an exit code (killed by a signal?); the end of $LOG_DIR/worker_$rank.log:" >&2
  log_tail "$LOG_DIR/worker_$rank.log" 20
  exit "$status"
fi
if (( ${#failed[@]} == 0 )); then
  echo "$me: msrun failed (exit $status) and no worker of this node did; the end of $LOG_DIR/scheduler.log" \
       "and $LOG_DIR/msrun.log:" >&2
  log_tail "$LOG_DIR/scheduler.log" 10
  log_tail "$LOG_DIR/msrun.log" 5
  exit "$status"
fi
rank=${failed[0]%%:*}; code=${failed[0]#*:}
others=""
if (( ${#failed[@]} > 1 )); then others=" (${#failed[@]} workers failed)"; fi
echo "$me: worker $rank exited with code $code$others; the end of $LOG_DIR/worker_$rank.log:" >&2
log_tail "$LOG_DIR/worker_$rank.log" 20
exit "$code"
