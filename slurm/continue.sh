#!/bin/bash
# Continue from a stable-phase checkpoint of a finished (or running) run, on new data, into a new run:
#   sbatch --export=ALL,INIT_FROM=runs/doge-160m-123/checkpoints/step-00018000,DATA=/shared/data/new,\
#   RECIPE=recipes/doge-160m.yaml,EXTRA="--max-steps 4000 --warmup-steps 0 --decay-steps 800" slurm/continue.sh
# The model comes from the checkpoint, the schedule from RECIPE and EXTRA; the source run is only read.
# Every #SBATCH line below is a default (sbatch flags or SBATCH_* variables override it); see slurm/launch.sh.
#SBATCH --job-name=doge-continue
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.log
#SBATCH --error=%x-%j.log
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
DOGE_SCRIPT=slurm/continue.sh
# Checked first, one line and exit 2: outside a SLURM job, or no slurm/launch.sh. It is found through
# DOGE_REPO, else beside this file (run in place), else in the folder sbatch ran in (sbatch runs a copy).
[[ -n "${SLURM_JOB_ID:-}" ]] || { echo "doge-slurm: error: not inside a SLURM job: submit it with" \
    "sbatch --export=ALL,DATA=/shared/data/web,INIT_FROM=RUNDIR/checkpoints/step-XXXXXXXX,RECIPE=recipes/doge-160m.yaml $DOGE_SCRIPT" >&2; exit 2; }
if [[ -z "${INIT_FROM:-}" || -z "${RECIPE:-}" ]]; then
    echo "doge-slurm: error: continue.sh needs INIT_FROM (a RUNDIR/checkpoints/step-XXXXXXXX folder) and RECIPE;" \
         "not requeued" >&2
    exit 2
fi
here=$(dirname "${BASH_SOURCE[0]}")
repo=${DOGE_REPO:-$([[ -f $here/launch.sh ]] && cd "$here/.." && pwd || echo "${SLURM_SUBMIT_DIR:-$PWD}")}
[[ -f $repo/slurm/launch.sh ]] || { echo "doge-slurm: error: $repo/slurm/launch.sh not found: submit from the" \
    "repository root or set DOGE_REPO to it; not requeued" >&2; exit 2; }
# shellcheck source=slurm/launch.sh
source "$repo/slurm/launch.sh"
