# Shared body of the slurm/*.sh batch scripts: they set RECIPE (and for continue.sh INIT_FROM) and
# source this file. Not a batch script itself. Settings, from the environment (sbatch exports it):
#   DATA          prepared DATADIR or mixture YAML (required)
#   RUN_DIR       run folder on shared storage (default runs/$SLURM_JOB_NAME-$SLURM_JOB_ID)
#   RECIPE        recipe YAML;  DS_CONFIG  DeepSpeed config (default ds_configs/zero2.json)
#   EXTRA         more trainer flags, e.g. EXTRA="--max-steps 2000 --wandb-project me"
#   INIT_FROM     checkpoint to start a new run from (--init-from)
#   MAX_RESTARTS  requeue after a time-limit save only while SLURM_RESTART_COUNT is below this (default 20)
#   CPU_RANKS_PER_NODE  ranks per node when the node has no GPU (default 1); MASTER_PORT, PYTHON
# Paths are relative to the repository: the one this file is in (the batch scripts find it through
# DOGE_REPO, their own folder, or the folder sbatch ran in).
#
# Checked before anything is written: outside a SLURM job, without the SLURM variables, srun or
# scontrol, with DATA unset, or with RECIPE, DS_CONFIG or INIT_FROM missing, the script prints one
# `doge-slurm [...] error: ...` line on stderr and exits 2, leaving no RUN_DIR behind. The trainer
# checks the rest (DATA's contents, the recipe's values) before it writes anything, and the hostfile
# is removed when the step ends, so a refused run leaves no RUN_DIR either.
#
# One `python -m doge.launch` per node (srun, one task per node): DeepSpeed's runner without ssh,
# every rank a child of a launcher that turns a stop signal into a save. The batch shell traps
# SIGUSR1 (sbatch --signal=B:USR1@SECS before the time limit, or `scancel --batch --signal=USR1`)
# and SIGTERM, forwards the signal to the step, waits for it, and then reads RUN_DIR/status.json:
#   finished                     -> exit 0 (even if a late signal disturbed the shutdown after it)
#   stopped after SIGUSR1        -> scontrol requeue (while restarts < MAX_RESTARTS); the next run
#                                   resumes from RUN_DIR/checkpoints/latest
#   stopped after SIGTERM        -> no requeue here (scancel stops a run; preemption and
#                                   `scontrol requeue` requeue the job themselves)
#   failed, or a non-zero exit   -> never requeued; the last log line says why
# shellcheck shell=bash

set -uo pipefail

say() { echo "doge-slurm [$(date +%T)] $*"; }
die() { say "error: $*; not requeued" >&2; exit 2; }

script=${DOGE_SCRIPT:-slurm/<script>.sh}
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    say "error: not inside a SLURM job: submit it with sbatch --export=ALL,DATA=/shared/data/web $script" >&2
    exit 2
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.." || die "cannot enter the repository of ${BASH_SOURCE[0]}"
[[ -f doge/launch.py ]] || die "$PWD is not the doge repository: set DOGE_REPO to it"
for name in SLURM_JOB_NAME SLURM_JOB_NODELIST SLURM_NNODES; do
    [[ -n "${!name:-}" ]] || die "$name is not set: this is not a batch job SLURM started; submit it with sbatch"
done
for tool in srun scontrol; do
    command -v "$tool" >/dev/null || die "$tool is not on PATH: run the job on a SLURM node"
done
[[ -n "${DATA:-}" ]] || die "DATA is not set: sbatch --export=ALL,DATA=/shared/data/web $script"
[[ -z "${RECIPE:-}" || -f "$RECIPE" ]] || die "RECIPE $RECIPE is not a file (relative paths start at $PWD)"
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
[[ -f "$DS_CONFIG" ]] || die "DS_CONFIG $DS_CONFIG is not a file (relative paths start at $PWD)"
[[ -z "${INIT_FROM:-}" || -d "$INIT_FROM" ]] \
    || die "INIT_FROM $INIT_FROM is not a folder: pass a RUNDIR/checkpoints/step-XXXXXXXX checkpoint"
RUN_DIR=${RUN_DIR:-runs/$SLURM_JOB_NAME-$SLURM_JOB_ID}
[[ ! -e "$RUN_DIR" || -d "$RUN_DIR" ]] || die "RUN_DIR $RUN_DIR is a file: choose a folder"
MAX_RESTARTS=${MAX_RESTARTS:-20}
restarts=${SLURM_RESTART_COUNT:-0}

# GPUs per node from SLURM's allocation (--gpus-per-node / --gres=gpu:N); none: CPU ranks with gloo.
gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
gpus=${gpus##*:}  # "a100:4" -> 4
if [[ ! "$gpus" =~ ^[0-9]+$ ]]; then gpus=0; fi
if (( gpus > 0 )); then per_node=$gpus; else per_node=${CPU_RANKS_PER_NODE:-1}; export DS_ACCELERATOR=cpu; fi

new_run_dir=$([[ -d "$RUN_DIR" ]] || echo yes)
mkdir -p "$RUN_DIR/slurm" || die "cannot create RUN_DIR $RUN_DIR"
hostfile=$RUN_DIR/slurm/hostfile-$SLURM_JOB_ID  # on shared storage: every node's launcher reads it
scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$per_node/" > "$hostfile" \
    || die "cannot write $hostfile"
master=$(head -n1 "$hostfile" | cut -d' ' -f1)
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

args=(doge/train.py --deepspeed "$DS_CONFIG" --data "$DATA" --output "$RUN_DIR")
[[ -n "${RECIPE:-}" ]] && args+=(--recipe "$RECIPE")
[[ -n "${INIT_FROM:-}" ]] && args+=(--init-from "$INIT_FROM")
read -ra extra <<< "${EXTRA:-}"
args+=("${extra[@]}")

say "job $SLURM_JOB_ID run $((restarts + 1)) on $SLURM_JOB_NODELIST: $SLURM_NNODES node(s) x $per_node" \
    "$( ((gpus > 0)) && echo GPU || echo CPU) rank(s), master $master:$MASTER_PORT, RUN_DIR $RUN_DIR"
say "trainer: ${args[*]}"

# The per-node command; SLURM_NODEID is the node's rank. exec: srun's signals reach doge.launch itself.
# shellcheck disable=SC2016  # expanded on each node, not here
node_cmd='echo "doge-slurm: node $SLURM_NODEID is $SLURMD_NODENAME"; exec "${PYTHON:-python}" -m doge.launch \
  --hostfile "$0" --no_ssh --node_rank "$SLURM_NODEID" --master_addr "$1" --master_port "$MASTER_PORT" "${@:2}"'
srun --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    bash -c "$node_cmd" "$hostfile" "$master" "${args[@]}" &
step=$!

got=""
# shellcheck disable=SC2317,SC2329  # called from the traps
forward() { got=$1; say "SIG$1: asking every rank to save and exit"; kill -s "$1" "$step" 2>/dev/null; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
# A trapped signal ends `wait` early: wait again until the step itself has exited.
while :; do
    wait "$step"; rc=$?
    kill -0 "$step" 2>/dev/null || break
done
trap '' USR1 TERM
# The hostfile served this step only; a run refused before it wrote anything leaves no RUN_DIR.
rm -f "$hostfile"
rmdir "$RUN_DIR/slurm" 2>/dev/null
[[ -n $new_run_dir ]] && rmdir "$RUN_DIR" 2>/dev/null

field() {  # field NAME: from RUN_DIR/status.json, written by the trainer
    "${PYTHON:-python}" -c 'import json, sys; print(json.load(open(sys.argv[1])).get(sys.argv[2]) or "")' \
        "$RUN_DIR/status.json" "$1" 2>/dev/null
}
state=$(field state); reason=$(field reason); at=$(field step)
if [[ $state == finished ]]; then  # written after the export: done, even if a late signal hit the shutdown
    say "finished at step $at$( ((rc == 0)) || echo " (step exit $rc after the trainer finished)")"; exit 0
fi
if (( rc == 0 )) && [[ $state == stopped ]]; then
    if [[ $got != USR1 ]]; then
        say "stopped at step $at (${reason:-signal ${got:-from outside}}); not requeued by this script"; exit 0
    fi
    if (( restarts >= MAX_RESTARTS )); then
        say "stopped at step $at; not requeued: $restarts restarts reached MAX_RESTARTS=$MAX_RESTARTS" \
            "(submit again with RUN_DIR=$RUN_DIR to continue)"; exit 1
    fi
    say "stopped at step $at; requeueing (restart $((restarts + 1)) of at most $MAX_RESTARTS)"
    scontrol requeue "$SLURM_JOB_ID" || { say "error: scontrol requeue failed"; exit 1; }
    exit 0
fi
(( rc != 0 )) || rc=1
say "failed (exit $rc): ${reason:-status ${state:-missing}}${at:+ at step $at}; not requeued"
exit "$rc"
