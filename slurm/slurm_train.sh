#!/bin/bash
# cellseg: one training phase on one GPU, headless (papermill runs notebooks/01_train.ipynb with the `cellseg` kernel).
#
#   sbatch slurm/slurm_train.sh -f configs/my_run.yaml                 # Phase 1 (PHASE defaults to 1)
#   sbatch slurm/slurm_train.sh -f configs/my_run.yaml -p PHASE 2      # Phase 2 (LoRA), starts from Phase 1's best
#   p1=$(sbatch --parsable slurm/slurm_train.sh -f configs/my_run.yaml)
#   sbatch --dependency=afterok:$p1 slurm/slurm_train.sh -f configs/my_run.yaml -p PHASE 2
#   MAX_REQUEUES=3 sbatch --time=04:00:00 slurm/slurm_train.sh -f configs/my_run.yaml
#
# Every argument goes to papermill (-f FILE, -p NAME VALUE, -r NAME VALUE for raw strings, -y YAML); they are
# validated before the notebook starts. Submit from the project root (or set CELLSEG_ROOT): the log goes to
# ./slurm-<job name>-<job id>.out (the submit directory always exists; sbatch would not create a logs/ folder), and
# the job's own directory RUN_DIR/jobs/<job id>/ gets the executed notebook(s), a link to that log and attempts.jsonl.
#
# Time limits and preemption: SLURM sends USR1 to this script 300 s (up to 360 s) before the end; the script turns it
# into RUN_DIR/STOP, the training loop saves latest.pt at its next step and writes "preempted, resumable" to
# RUN_DIR/phase{N}/status.json, and the script requeues the job (at most MAX_REQUEUES times, default 10); the
# restarted job resumes from latest.pt. STOP_AT is also set to the end time minus CELLSEG_STOP_MARGIN (300 s).
# Exit codes: 0 finished (or requeued), 1 failed, 2 set-up error, 3 stopped and resumable but not requeued.
# Details and the other knobs: slurm/common.sh and HPC_SETUP_GUIDE.md.
#
#SBATCH --job-name=cellseg-train
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --gres=gpu:1
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
## Site settings: uncomment (remove one '#') and fill in; sbatch options on the command line override them.
##SBATCH --account=<your-account>
##SBATCH --partition=<gpu-partition>
## Host memory: most clusters give a per-CPU default; size it here otherwise (UNI ViT-L Phase 2: ~64G). A notebook that ends
## with "Kernel died" / state OUT_OF_MEMORY: sacct -j <jobid> -o JobID,State,MaxRSS,ReqMem, then raise --mem.
##SBATCH --mem=64G

set -uo pipefail
# sbatch runs a spooled copy of this file: find the checkout from the submit directory, not from $0.
_cs_dir="${CELLSEG_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
while [[ $_cs_dir != / && ! -f $_cs_dir/slurm/common.sh ]]; do _cs_dir="$(dirname "$_cs_dir")"; done
[[ -f $_cs_dir/slurm/common.sh ]] || { echo "cellseg: no slurm/common.sh at or above ${CELLSEG_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}; submit from the project root or set CELLSEG_ROOT" >&2; exit 2; }
# shellcheck source=slurm/common.sh
source "$_cs_dir/slurm/common.sh"

cs_train_job single "$@"
