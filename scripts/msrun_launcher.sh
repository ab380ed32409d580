#!/usr/bin/env bash
# Launch a mindport job on one or more nodes with msrun, in mindformers' positional form.
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
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

case $# in
  1) CMD=$1; WORKER_NUM=8; LOCAL_WORKER=8; MASTER_ADDR=127.0.0.1; MASTER_PORT=8118; NODE_RANK=0
     LOG_DIR=output/msrun_log; JOIN=False; CLUSTER_TIME_OUT=7200 ;;
  2) CMD=$1; WORKER_NUM=$2; LOCAL_WORKER=$2; MASTER_ADDR=127.0.0.1; MASTER_PORT=8118; NODE_RANK=0
     LOG_DIR=output/msrun_log; JOIN=False; CLUSTER_TIME_OUT=7200 ;;
  6) CMD=$1; WORKER_NUM=$2; LOCAL_WORKER=$2; MASTER_ADDR=127.0.0.1; MASTER_PORT=$3; NODE_RANK=0
     LOG_DIR=$4; JOIN=$5; CLUSTER_TIME_OUT=$6 ;;
  9) CMD=$1; WORKER_NUM=$2; LOCAL_WORKER=$3; MASTER_ADDR=$4; MASTER_PORT=$5; NODE_RANK=$6
     LOG_DIR=$7; JOIN=$8; CLUSTER_TIME_OUT=$9 ;;
  *) echo "msrun_launcher.sh: error: expected 1, 2, 6 or 9 arguments, got $#" >&2; usage ;;
esac

for name in WORKER_NUM LOCAL_WORKER MASTER_PORT NODE_RANK CLUSTER_TIME_OUT; do
  [[ ${!name} =~ ^[0-9]+$ ]] || { echo "msrun_launcher.sh: error: $name = '${!name}': expected an integer" >&2; exit 2; }
done
(( LOCAL_WORKER <= WORKER_NUM )) || { echo "msrun_launcher.sh: error: LOCAL_WORKER = $LOCAL_WORKER exceeds WORKER_NUM = $WORKER_NUM" >&2; exit 2; }
case ${JOIN,,} in true|false) ;; *) echo "msrun_launcher.sh: error: JOIN = '$JOIN': expected True or False" >&2; exit 2 ;; esac

eval "ARGS=($CMD)"  # CMD is a shell command line: honour its quoting ("--prompt 'two words'")
if [[ ${ARGS[0]} == mindport ]]; then  # msrun runs a Python script: use the CLI module's file
  ARGS[0]=$(python -c 'import mindport.cli as c; print(c.__file__)')
fi

mkdir -p "$LOG_DIR"
exec msrun --worker_num="$WORKER_NUM" --local_worker_num="$LOCAL_WORKER" --master_addr="$MASTER_ADDR" \
  --master_port="$MASTER_PORT" --node_rank="$NODE_RANK" --log_dir="$LOG_DIR" --join="$JOIN" \
  --cluster_time_out="$CLUSTER_TIME_OUT" "${ARGS[@]}"
