#!/bin/bash
# cellseg: evaluate a trained checkpoint (notebooks/02_evaluate.ipynb) on one GPU, headless.
#
#   sbatch slurm/slurm_eval.sh -f configs/my_run.yaml                           # Phase 2's best on the test split
#   sbatch slurm/slurm_eval.sh -f configs/my_run.yaml -p EVAL_PHASE 1 -p EVAL_CHECKPOINT latest
#   sbatch --dependency=afterok:$p2 slurm/slurm_eval.sh -f configs/my_run.yaml
#
# Same set-up as slurm_train.sh (root, environment, kernelspec check, parameters to papermill, job directory
# RUN_DIR/jobs/<job id>/ with the executed notebook). Evaluation keeps no resumable state, so there is no stop
# signal and no requeue: the job finished when papermill exits 0 and the evaluation folder's metrics.json
# (RUN_DIR/eval/phase<EVAL_PHASE>-<EVAL_CHECKPOINT>-<EVAL_SPLIT>/metrics.json) was written by it.
# RUN_DIR/eval/index.jsonl lists every evaluation; `cellseg runs summarize RUN_DIR ...` tabulates them.
# Exit codes: 0 finished, 1 failed, 2 set-up error.
#
#SBATCH --job-name=cellseg-eval
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --gres=gpu:1
#SBATCH --time=04:00:00
## Site settings: uncomment (remove one '#') and fill in; sbatch options on the command line override them.
##SBATCH --account=<your-account>
##SBATCH --partition=<gpu-partition>
## Host memory: most clusters give a per-CPU default; size it here otherwise (measure it: sacct MaxRSS of a first job). A notebook that ends
## with "Kernel died" / state OUT_OF_MEMORY: sacct -j <jobid> -o JobID,State,MaxRSS,ReqMem, then raise --mem.
##SBATCH --mem=32G

set -uo pipefail
_cs_dir="${CELLSEG_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
while [[ $_cs_dir != / && ! -f $_cs_dir/slurm/common.sh ]]; do _cs_dir="$(dirname "$_cs_dir")"; done
[[ -f $_cs_dir/slurm/common.sh ]] || { echo "cellseg: no slurm/common.sh at or above ${CELLSEG_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}; submit from the project root or set CELLSEG_ROOT" >&2; exit 2; }
# shellcheck source=slurm/common.sh
source "$_cs_dir/slurm/common.sh"

cs_eval_job "$@"
