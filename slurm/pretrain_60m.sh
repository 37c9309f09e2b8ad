#!/bin/bash
# Pre-train Doge-60M (recipes/doge-60m.yaml): sbatch --export=ALL,DATA=/shared/data/web slurm/pretrain_60m.sh
# Every #SBATCH line below is a default: sbatch flags (--nodes=4, --partition=..., --account=...) or
# SBATCH_* variables override it; DATA, RUN_DIR, RECIPE, DS_CONFIG, EXTRA: see slurm/launch.sh.
#SBATCH --job-name=doge-60m
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.log
#SBATCH --error=%x-%j.log
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
RECIPE=${RECIPE:-recipes/doge-60m.yaml}
# sbatch runs a copy of this file, so the launcher is found from where sbatch was called
source "${DOGE_REPO:-$SLURM_SUBMIT_DIR}/slurm/launch.sh"
