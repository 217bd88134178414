#!/bin/bash
# cellseg: check a job's parameters on the login node, then sbatch it, so a typo never waits in the queue.
#
#   slurm/submit.sh train [SBATCH_OPTIONS...] -- -f configs/my_run.yaml -p PHASE 2
#   slurm/submit.sh ddp --nodes=2 -- -f configs/my_run.yaml
#   slurm/submit.sh eval --dependency=afterok:4242 -- -f configs/my_run.yaml
#   slurm/submit.sh --dry-run train -- -f configs/my_run.yaml      # check and print the sbatch command only
#
# train / ddp / eval select slurm/slurm_train.sh, slurm_train_ddp.sh, slurm_eval.sh. Options before `--` go to
# sbatch, arguments after it to papermill (as for the scripts themselves). Before submitting it
#   1. validates the papermill arguments with the notebook's own configuration check (the same the job runs first),
#   2. runs `cellseg doctor` and refuses on a FAIL in parameters, data or weights (the GPU is the compute node's
#      business: the job's own doctor checks it),
#   3. names the job per phase (cellseg-train-p1, cellseg-ddp-p2, cellseg-eval) unless --job-name is given.
# Exit codes: sbatch's on submission (the job id is printed), 2 when a check failed (nothing was submitted).
set -uo pipefail

die() { printf 'submit.sh: %s\n' "$1" >&2; exit 2; }

dry=0
if [[ ${1:-} == --dry-run ]]; then dry=1; shift; fi
mode="${1:-}"; shift || true
case "$mode" in
  train) script=slurm_train.sh notebook=01_train name=cellseg-train ;;
  ddp) script=slurm_train_ddp.sh notebook=01_train name=cellseg-ddp ;;
  eval) script=slurm_eval.sh notebook=02_evaluate name=cellseg-eval ;;
  *) die "first argument must be train, ddp or eval, got '${mode}' (usage: slurm/submit.sh train [SBATCH_OPTIONS...] -- PAPERMILL_ARGS...)" ;;
esac
sbatch_opts=()
while [[ $# -gt 0 && $1 != -- ]]; do sbatch_opts+=("$1"); shift; done
[[ ${1:-} == -- ]] || die "put the papermill arguments after --, e.g. slurm/submit.sh $mode -- -f configs/my_run.yaml"
shift
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || die "cannot cd to $root"

# The same environment the job will use (slurm/common.sh's order), so the check runs the job's own code.
py=""
for cand in "${CELLSEG_ENV:-}" "${VIRTUAL_ENV:-}" "${CONDA_PREFIX:-}" "$root/.venv"; do
  if [[ -n $cand && -x $cand/bin/python ]]; then py="$cand/bin/python"; break; fi
done
[[ -n $py ]] || die "no Python environment: activate the cellseg env or set CELLSEG_ENV (HPC_SETUP_GUIDE.md section 1)"

info="$("$py" -m cellseg.slurm_helpers run-info --notebook "$notebook" --root "$root" -- "$@" 2>&1)" \
  || die "${info#cellseg slurm: } (nothing submitted)"
eval "$info"

doctor="$("$py" -m cellseg.commands.doctor --no-hash --checks parameters,data,weights,disk --notebook "$notebook" -- "$@" 2>/dev/null)"
printf '%s\n' "$doctor"
fails="$(grep -E '^FAIL +(parameters|data|weights) ' <<<"$doctor")"
[[ -z $fails ]] || die "cellseg doctor: ${fails//$'\n'/; } (nothing submitted)"

has_name=0
for o in ${sbatch_opts[@]+"${sbatch_opts[@]}"}; do [[ $o == --job-name* || $o == -J* ]] && has_name=1; done
if (( ! has_name )); then
  [[ $mode == eval ]] || name="$name-p$CS_PHASE"
  sbatch_opts=(--job-name="$name" ${sbatch_opts[@]+"${sbatch_opts[@]}"})
fi
cmd=(sbatch "${sbatch_opts[@]}" "slurm/$script" "$@")
printf 'submit.sh: %s\n' "${cmd[*]}"
(( dry )) && exit 0
command -v sbatch >/dev/null || die "sbatch is not on PATH (run this on the cluster's login node)"
exec "${cmd[@]}"
