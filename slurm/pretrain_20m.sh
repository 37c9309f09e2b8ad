#!/bin/bash
# Pre-train Doge-20M (recipes/doge-20m.yaml): sbatch --export=ALL,DATA=/shared/data/web slurm/pretrain_20m.sh
# Every #SBATCH line below is a default: sbatch flags (--nodes=4, --partition=..., --account=...) or
# SBATCH_* variables override it; DATA, RUN_DIR, RECIPE, DS_CONFIG, EXTRA: see slurm/launch.sh.
#SBATCH --job-name=doge-20m
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.log
#SBATCH --error=%x-%j.log
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
RECIPE=${RECIPE:-recipes/doge-20m.yaml}
DOGE_SCRIPT=slurm/pretrain_20m.sh
# Checked first, one line and exit 2: outside a SLURM job, or no slurm/launch.sh. It is found through
# DOGE_REPO, else beside this file (run in place), else in the folder sbatch ran in (sbatch runs a copy).
[[ -n "${SLURM_JOB_ID:-}" ]] || { echo "doge-slurm: error: not inside a SLURM job: submit it with" \
    "sbatch --export=ALL,DATA=/shared/data/web $DOGE_SCRIPT" >&2; exit 2; }
here=$(dirname "${BASH_SOURCE[0]}")
repo=${DOGE_REPO:-$([[ -f $here/launch.sh ]] && cd "$here/.." && pwd || echo "${SLURM_SUBMIT_DIR:-$PWD}")}
[[ -f $repo/slurm/launch.sh ]] || { echo "doge-slurm: error: $repo/slurm/launch.sh not found: submit from the" \
    "repository root or set DOGE_REPO to it; not requeued" >&2; exit 2; }
# shellcheck source=slurm/launch.sh
source "$repo/slurm/launch.sh"
