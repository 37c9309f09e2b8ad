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
if [[ -z "${INIT_FROM:-}" || -z "${RECIPE:-}" ]]; then
    echo "doge-slurm: error: continue.sh needs INIT_FROM (a RUNDIR/checkpoints/step-XXXXXXXX folder) and RECIPE;" \
         "not requeued"
    exit 2
fi
# sbatch runs a copy of this file, so the launcher is found from where sbatch was called
source "${DOGE_REPO:-$SLURM_SUBMIT_DIR}/slurm/launch.sh"
