#!/bin/bash
# cellseg: apply a trained checkpoint to a list of images or slides (cellseg predict), one array task per line.
#
#   ls /data/slides/*.svs > slides.txt
#   sbatch --array=1-$(wc -l < slides.txt) slurm/slurm_predict.sh slides.txt \
#       --checkpoint checkpoints/phase2/best.pt --out runs/predict [-f configs/my_run.yaml] [-p NAME VALUE ...]
#   sbatch slurm/slurm_predict.sh slides.txt --checkpoint ...      # no array: every line in one job
#
# The first argument is the file list (one path, folder or glob per line; blank lines and '#' comments skipped);
# task N of the array predicts line N (SLURM_ARRAY_TASK_ID, 1-based). Every other argument goes to `cellseg predict`.
# All tasks write into the same --out folder: OUT/<input stem>/ per input, and OUT/summary.csv is rebuilt from every
# finished input's summary.json by each task. The warning signal (USR1 300 s before the time limit) and TERM are
# passed to the prediction as SIGTERM: it finishes the current window, records its progress and exits 3; a stop the
# scheduler asked for (USR1) is requeued (--requeue) and continues where it stopped.
# Exit codes: 0 finished; 1 some inputs could not be predicted (named in the log); 2 set-up or parameter error;
# 3 stopped, resumable, not requeued.
#
#SBATCH --job-name=cellseg-predict
#SBATCH --output=slurm-%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --gres=gpu:1
#SBATCH --time=08:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue

set -uo pipefail
_cs_dir="${CELLSEG_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
while [[ $_cs_dir != / && ! -f $_cs_dir/slurm/common.sh ]]; do _cs_dir="$(dirname "$_cs_dir")"; done
[[ -f $_cs_dir/slurm/common.sh ]] || { echo "cellseg: no slurm/common.sh at or above ${CELLSEG_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}; submit from the project root or set CELLSEG_ROOT" >&2; exit 2; }
# shellcheck source=slurm/common.sh
source "$_cs_dir/slurm/common.sh"

[[ $# -ge 1 ]] || cs_die "usage: sbatch [--array=1-N] slurm/slurm_predict.sh FILE_LIST --checkpoint CKPT --out DIR [-f YAML] [-p NAME VALUE ...]"
list="$1"; shift
export CELLSEG_ROOT
CELLSEG_ROOT="$(cs_find_root)" || cs_die "cannot find the project root; set CELLSEG_ROOT"
[[ $list = /* ]] || list="${SLURM_SUBMIT_DIR:-$PWD}/$list"
[[ -f $list ]] || cs_die "file list $list does not exist: give a text file with one image, slide, folder or glob per line"
cd "$CELLSEG_ROOT" || cs_die "cannot cd to $CELLSEG_ROOT"
cs_setup_env
if [[ -n ${SLURM_CPUS_PER_TASK:-} && -z ${OMP_NUM_THREADS:-} ]]; then export OMP_NUM_THREADS="$SLURM_CPUS_PER_TASK"; fi

mapfile -t inputs < <(grep -v -e '^[[:space:]]*$' -e '^[[:space:]]*#' "$list")
[[ ${#inputs[@]} -gt 0 ]] || cs_die "file list $list names no input"
if [[ -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
  n="$SLURM_ARRAY_TASK_ID"
  [[ $n -ge 1 && $n -le ${#inputs[@]} ]] \
    || cs_die "array task $n but $list has ${#inputs[@]} inputs: submit with --array=1-${#inputs[@]}"
  inputs=("${inputs[$((n - 1))]}")
fi
cs_log "job ${SLURM_JOB_ID:-local} task ${SLURM_ARRAY_TASK_ID:-all} on $(hostname): ${#inputs[@]} input(s): ${inputs[*]}"

CS_SIGNAL=""
pid=""
forward() {
  [[ $1 != TERM && -z $CS_SIGNAL ]] && CS_SIGNAL="$1"
  cs_log "caught SIG$1: asking the prediction to finish its current window and stop"
  [[ -n $pid ]] && kill -TERM "$pid" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward USR2' USR2
trap 'forward TERM' TERM
"$CS_PY" -m cellseg predict --input "${inputs[@]}" "$@" &
pid=$!
while true; do
  wait "$pid"; rc=$?
  kill -0 "$pid" 2>/dev/null || break  # wait returned for a trapped signal: keep waiting
done
trap - USR1 USR2 TERM
if [[ $rc == 3 && -n $CS_SIGNAL && -n ${SLURM_JOB_ID:-} ]]; then
  if scontrol requeue "$SLURM_JOB_ID"; then
    cs_log "stopped on SIG$CS_SIGNAL: REQUEUED; the next attempt continues where this one stopped"
    exit 0
  fi
  cs_log "scontrol requeue failed: resubmit the same command to continue"
fi
case $rc in
  0) cs_log "finished" ;;
  1) cs_log "finished, but some inputs could not be predicted (listed above)" ;;
  3) cs_log "stopped, resumable: submit the same command again to continue" ;;
  *) cs_log "FAILED (exit $rc)" ;;
esac
exit "$rc"
