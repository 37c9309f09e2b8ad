#!/bin/bash
# Tokenize a corpus as a job array: each task prepares a disjoint set of the input files, the last
# one to finish writes one DATADIR over all parts (same samples whatever the array size):
#   sbatch --array=0-15 --export=ALL,INPUT="/shared/raw/web/*.jsonl.gz",TOKENIZER=/shared/tokenizer,\
#   OUTPUT=/shared/data/web,PREP_FLAGS="--seq-len 2048 --workers 16" slurm/prepare.sh
# A failed or preempted task reruns alone, e.g. task 3: sbatch --array=3 ... slurm/prepare.sh (same settings).
# INPUT is word-split (quote globs so the task expands them); PREP_FLAGS go to data_tools/prepare.py.
#SBATCH --job-name=doge-prepare
#SBATCH --array=0-7
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --output=%x-%A_%a.log
#SBATCH --error=%x-%A_%a.log
#SBATCH --open-mode=append
#SBATCH --requeue
set -uo pipefail
fail() { echo "doge-slurm: error: $*" >&2; exit 2; }
# Checked before anything runs, one line and exit 2 each: outside a SLURM job, not an array task, a
# setting missing, no repository. The repository is DOGE_REPO, else the one this file is in (run in
# place), else the folder sbatch ran in (sbatch runs a copy of this file).
[[ -n "${SLURM_JOB_ID:-}" ]] || fail "not inside a SLURM job: submit it as an array:" \
    "sbatch --array=0-7 --export=ALL,INPUT=...,TOKENIZER=...,OUTPUT=... slurm/prepare.sh"
[[ -n "${SLURM_ARRAY_TASK_ID:-}" && -n "${SLURM_ARRAY_TASK_MAX:-}" ]] \
    || fail "not an array task: submit as an array: sbatch --array=0-N ... slurm/prepare.sh"
for name in INPUT TOKENIZER OUTPUT; do
    [[ -n "${!name:-}" ]] || fail "$name is not set: sbatch --export=ALL,INPUT=...,TOKENIZER=...,OUTPUT=... (see slurm/prepare.sh)"
done
here=$(dirname "${BASH_SOURCE[0]}")
repo=${DOGE_REPO:-$([[ -f $here/launch.sh ]] && cd "$here/.." && pwd || echo "${SLURM_SUBMIT_DIR:-$PWD}")}
[[ -f $repo/data_tools/prepare_parts.py ]] || fail "$repo is not the doge repository: submit from its root or set DOGE_REPO"
cd "$repo" || fail "cannot enter $repo"
# The first task records this array's size in OUTPUT/parts/plan.json; a rerun of one task follows it.
tasks=$((SLURM_ARRAY_TASK_MAX + 1))
read -ra inputs <<< "$INPUT"
read -ra flags <<< "${PREP_FLAGS:-}"
exec "${PYTHON:-python}" data_tools/prepare_parts.py --task "$SLURM_ARRAY_TASK_ID" --tasks "$tasks" \
    --input "${inputs[@]}" --output "$OUTPUT" -- --tokenizer "$TOKENIZER" "${flags[@]}"
