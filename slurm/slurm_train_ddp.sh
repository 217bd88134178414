#!/bin/bash
# cellseg: one training phase with DistributedDataParallel over several GPUs on one or more nodes.
#
#   sbatch slurm/slurm_train_ddp.sh -f configs/my_run.yaml                       # 1 node x 4 GPUs
#   sbatch --nodes=2 slurm/slurm_train_ddp.sh -f configs/my_run.yaml -p PHASE 2  # 2 nodes x 4 GPUs = 8 ranks
#   CELLSEG_LAUNCHER=torchrun sbatch slurm/slurm_train_ddp.sh -f configs/my_run.yaml
#
# Every rank executes notebooks/01_train.ipynb with papermill in its own kernel, so the notebook stays the one
# training program (no second entry point to keep in sync):
#   - launcher srun (default): one task per GPU (#SBATCH --ntasks-per-node = GPUs per node). Each task's kernel sees
#     SLURM_PROCID (global rank), SLURM_NTASKS (world size) and SLURM_LOCALID (local rank -> cuda:LOCAL_RANK; all
#     GPUs of the node stay visible to every task, so do not bind one GPU per task with --gpus-per-task).
#   - launcher torchrun (CELLSEG_LAUNCHER=torchrun): one srun task per node runs `torchrun --no-python`, which starts
#     --ntasks-per-node papermill processes with RANK / WORLD_SIZE / LOCAL_RANK (c10d rendezvous on
#     MASTER_ADDR:MASTER_PORT, id = job id). torchrun dies on USR1; it never gets it here (only this shell does).
#   - MASTER_ADDR = first host of the allocation (scontrol show hostnames), MASTER_PORT = 20000 + (job id + restart
#     count) mod 20000 unless exported; gloo on CPU, NCCL on GPU (cellseg.distributed).
#   - only rank 0 writes checkpoints, histories, reports and the executed notebook RUN_DIR/jobs/<id>/
#     01_train_phase<N>.attempt<r>.ipynb (with its output streamed to this job's log); rank k writes
#     01_train_phase<N>.attempt<r>.rank<k>.ipynb next to it (CELLSEG_RANK_NOTEBOOKS=discard sends them to /dev/null).
# Log lines carry srun's rank label ("0: ", "1: "). The stop/requeue logic, parameters and exit codes are those of
# slurm_train.sh: the STOP file written on SLURM's warning signal reaches every rank; the ranks agree on the step.
#
#SBATCH --job-name=cellseg-ddp
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
## Site settings: uncomment (remove one '#') and fill in; sbatch options on the command line override them.
##SBATCH --account=<your-account>
##SBATCH --partition=<gpu-partition>
## Host memory: most clusters give a per-CPU default; size it here otherwise (0 = all of the node's memory). A notebook that ends
## with "Kernel died" / state OUT_OF_MEMORY: sacct -j <jobid> -o JobID,State,MaxRSS,ReqMem, then raise --mem.
##SBATCH --mem=0

set -uo pipefail
_cs_dir="${CELLSEG_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
while [[ $_cs_dir != / && ! -f $_cs_dir/slurm/common.sh ]]; do _cs_dir="$(dirname "$_cs_dir")"; done
[[ -f $_cs_dir/slurm/common.sh ]] || { echo "cellseg: no slurm/common.sh at or above ${CELLSEG_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}; submit from the project root or set CELLSEG_ROOT" >&2; exit 2; }
# shellcheck source=slurm/common.sh
source "$_cs_dir/slurm/common.sh"

cs_train_job ddp "$@"
