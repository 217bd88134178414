# shellcheck shell=bash
# Shared set-up of the cellseg batch scripts (slurm_train.sh, slurm_train_ddp.sh, slurm_eval.sh). Sourced, never run:
# it only defines functions; the scripts call cs_train_job / cs_eval_job, and every DDP rank calls cs_rank_exec.
#
# What a job does (HPC_SETUP_GUIDE.md has the long version):
#   1. project root: $CELLSEG_ROOT, else the first directory at or above $SLURM_SUBMIT_DIR holding slurm/common.sh
#      (sbatch runs a copy of the script from a spool directory, so `dirname $0` would be wrong);
#   2. environment: $CELLSEG_ENV (a venv or conda prefix), else the activated $VIRTUAL_ENV / conda env, else
#      ROOT/.venv (with a WARNING when an activated env is chosen over an existing ROOT/.venv); it must import cellseg
#      and papermill; the Jupyter kernelspec $CELLSEG_KERNEL (default cellseg) must exist and start that environment's
#      python; `cellseg doctor` then logs the set-up and stops the job on a FAIL line (e.g. no data on this node);
#   3. parameters: all script arguments go to papermill (-f FILE, -p NAME VALUE, -r NAME VALUE, -y YAML, other
#      papermill options); they are validated first, and RUN_DIR etc. are read from them;
#   4. job directory RUN_DIR/jobs/<job id>/: executed notebooks (<notebook>.attempt<restart>.ipynb, other ranks
#      <...>.rank<k>.ipynb), slurm.out -> the job's log file, attempts.jsonl (one line per attempt and its verdict);
#   5. stop requests (training only): the warning signal (#SBATCH --signal=B:USR1@300; USR2 too; TERM is forwarded
#      but never requeues) becomes a STOP file in RUN_DIR, tagged with the job id, that every rank of every launcher
#      sees at its next step; STOP_AT is set to the job's end time minus CELLSEG_STOP_MARGIN seconds (default 300)
#      unless given; tagged STOP files of this job or of jobs no longer queued are removed at the start;
#   6. verdict from RUN_DIR/phase{N}/status.json (not from papermill's/srun's exit code): finished / preempted /
#      failed; a preempted attempt that the scheduler stopped is requeued (scontrol requeue) while
#      SLURM_RESTART_COUNT < MAX_REQUEUES (default 10) and it made progress; the requeued job resumes (RESUME=auto).
# Exit codes: 0 finished (or requeued: the log says REQUEUED and the job goes back to PENDING); 1 failed; 2 set-up
# error (parameters, environment, kernelspec, time limit shorter than the margin); 3 stopped, resumable, not requeued.
#
# Knobs (environment variables, exported at sbatch time): CELLSEG_ROOT, CELLSEG_ENV, CELLSEG_KERNEL, MAX_REQUEUES,
# CELLSEG_STOP_MARGIN, CELLSEG_PREPARE (auto|always|never: run 00_prepare_data first when the data cache is missing
# or was prepared for other parameters), CELLSEG_LAUNCHER (srun|torchrun, DDP only), CELLSEG_RANK_NOTEBOOKS (keep|discard), MASTER_PORT,
# CELLSEG_KERNEL_START_TIMEOUT (seconds papermill waits for a kernel to start, default 300).

CS_EXIT_FAILED=1
CS_EXIT_SETUP=2
CS_EXIT_STOPPED=3

cs_log() { printf '[cellseg %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# cs_squeue ARGS...: squeue whose output this script can parse whatever the user's shell sets: SLURM_TIME_FORMAT
# (relative or strftime times would break the end-time parse and fail every job at start), SQUEUE_FORMAT*/SORT/STATES.
cs_squeue() {
  env -u SQUEUE_FORMAT -u SQUEUE_FORMAT2 -u SQUEUE_SORT -u SQUEUE_STATES -u SQUEUE_ALL -u SQUEUE_ARRAY \
    SLURM_TIME_FORMAT=standard squeue "$@"
}

# cs_die MESSAGE [CODE]: log and exit (default: set-up error).
cs_die() {
  printf '[cellseg %s] ERROR: %s\n' "$(date +%H:%M:%S)" "$1" >&2
  exit "${2:-$CS_EXIT_SETUP}"
}

# cs_find_root: print the project root (the directory holding slurm/common.sh).
cs_find_root() {
  if [[ -n ${CELLSEG_ROOT:-} ]]; then
    [[ -f $CELLSEG_ROOT/slurm/common.sh ]] || { echo "CELLSEG_ROOT=$CELLSEG_ROOT has no slurm/common.sh" >&2; return 1; }
    (cd "$CELLSEG_ROOT" && pwd)
    return 0
  fi
  local d
  d="$(cd "${SLURM_SUBMIT_DIR:-$PWD}" && pwd)" || return 1
  while [[ $d != / && ! -f $d/slurm/common.sh ]]; do d="$(dirname "$d")"; done
  [[ -f $d/slurm/common.sh ]] || { echo "no slurm/common.sh at or above ${SLURM_SUBMIT_DIR:-$PWD}" >&2; return 1; }
  printf '%s\n' "$d"
}

# cs_setup_env: choose the environment, put it first on PATH, check cellseg/papermill and the kernelspec.
cs_setup_env() {
  local env="${CELLSEG_ENV:-}" why="CELLSEG_ENV"
  # An environment the user activated before sbatch (exported with the job) wins over ROOT/.venv: it is the one they
  # installed into. conda's base environment counts only when nothing else is there.
  if [[ -z $env ]]; then
    if [[ -n ${VIRTUAL_ENV:-} ]]; then env="$VIRTUAL_ENV"; why="the activated virtualenv (VIRTUAL_ENV)"
    elif [[ -n ${CONDA_PREFIX:-} && ${CONDA_DEFAULT_ENV:-} != base ]]; then env="$CONDA_PREFIX"; why="the activated conda env"
    elif [[ -x $CELLSEG_ROOT/.venv/bin/python ]]; then env="$CELLSEG_ROOT/.venv"; why="ROOT/.venv (no environment activated)"
    elif [[ -n ${CONDA_PREFIX:-} ]]; then env="$CONDA_PREFIX"; why="conda's base env (nothing else found)"
    else cs_die "no Python environment: set CELLSEG_ENV to the conda env or venv prefix (conda env create -f environment.yml; see HPC_SETUP_GUIDE.md), or create $CELLSEG_ROOT/.venv with make setup."
    fi
    if [[ $env != "$CELLSEG_ROOT/.venv" && -x $CELLSEG_ROOT/.venv/bin/python ]]; then
      cs_log "WARNING: using $why $env, not $CELLSEG_ROOT/.venv; set CELLSEG_ENV=$CELLSEG_ROOT/.venv (or deactivate before sbatch) to use that one"
    fi
  fi
  [[ -x $env/bin/python ]] || cs_die "CELLSEG_ENV=$env has no bin/python; point it at the environment's prefix (e.g. \$(conda info --base)/envs/cellseg)."
  export CELLSEG_ENV="$env"
  export PATH="$env/bin:$PATH"
  CS_PY="$env/bin/python"
  local where
  where="$("$CS_PY" -c 'import cellseg, papermill, os; print(os.path.dirname(cellseg.__file__))' 2>&1)" \
    || cs_die "environment $env cannot import cellseg and papermill: $where. Install the project into it (pip install -e . --no-deps)."
  case "$where" in
    "$CELLSEG_ROOT"/*) ;;
    *) cs_log "WARNING: cellseg is imported from $where, not from this checkout ($CELLSEG_ROOT/lib)" ;;
  esac
  export CELLSEG_KERNEL="${CELLSEG_KERNEL:-cellseg}"
  local spec
  spec="$("$CS_PY" -m cellseg.slurm_helpers check-kernel --name "$CELLSEG_KERNEL" 2>&1)" || cs_die "$spec"
  cs_log "environment $env [$why] ($("$CS_PY" -c 'import sys; print(sys.version.split()[0])')), kernel $CELLSEG_KERNEL at $spec"
}

# cs_doctor NOTEBOOK ARGS...: `cellseg doctor` for this job's parameters into the log (what a bug report needs); a
# FAIL line (no data on this node, missing weights, no GPU for DEVICE=cuda, ...) stops the job before it trains.
cs_doctor() {
  local notebook="$1"; shift
  local out rc
  # Without torchvision's operator test and the Jupyter lines (the kernelspec was checked above): those import torch
  # and JupyterLab, seconds every job would pay; the GPU line imports torch only when there is a GPU.
  out="$("$CS_PY" -m cellseg.commands.doctor --notebook "$notebook" --kernel "$CELLSEG_KERNEL" \
    --checks python,cellseg,torch,gpu,parameters,data,weights,disk,slurm -- "$@" 2>&1)"; rc=$?
  cs_log "cellseg doctor:"
  printf '%s\n' "$out" | sed 's/^/    /'
  (( rc == 0 )) || cs_die "cellseg doctor found a problem (the FAIL lines above); fix it before the job runs (data: fetch it on a login node, e.g. cellseg data fetch bccd DIR; see HPC_SETUP_GUIDE.md)"
}

# cs_resolve_run NOTEBOOK ARGS...: validate the papermill arguments; sets CS_RUN_DIR, CS_STATUS_FILE, ... (CS_*).
cs_resolve_run() {
  local notebook="$1"; shift
  local out
  out="$("$CS_PY" -m cellseg.slurm_helpers run-info --notebook "$notebook" --root "$CELLSEG_ROOT" -- "$@" 2>&1)" \
    || cs_die "${out#cellseg slurm: }"
  eval "$out"
}

# cs_job_dir: CS_JOB_ID, CS_RESTART, CS_JOB_DIR (created), the log link, and the attempts file.
cs_job_dir() {
  CS_RESTART="${SLURM_RESTART_COUNT:-0}"
  if [[ -n ${SLURM_JOB_ID:-} ]]; then CS_JOB_ID="$SLURM_JOB_ID"; else CS_JOB_ID="local-$(date +%Y%m%dT%H%M%S)-$$"; fi
  export CS_JOB_ID CS_PY
  export CS_JOB_DIR="$CS_RUN_DIR/jobs/$CS_JOB_ID"
  mkdir -p "$CS_JOB_DIR" || cs_die "cannot create the job directory $CS_JOB_DIR (RUN_DIR=$CS_RUN_DIR)"
  CS_ATTEMPTS="$CS_JOB_DIR/attempts.jsonl"
  if [[ -n ${SLURM_JOB_ID:-} ]]; then
    local stdout
    stdout="$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'StdOut=[^ ]*' | cut -d= -f2-)"
    [[ -n $stdout && -e $stdout ]] && ln -sfn "$stdout" "$CS_JOB_DIR/slurm.out"
  fi
  cs_log "job $CS_JOB_ID restart $CS_RESTART on $(hostname) (${SLURM_JOB_NODELIST:-no allocation}), root $CELLSEG_ROOT, job dir $CS_JOB_DIR"
}

# ---------------------------------------------------------------------------------------------------------------
# stop requests
# ---------------------------------------------------------------------------------------------------------------
CS_SIGNAL=""
CS_DEADLINE=""

cs_stop_file() { printf '%s\n' "$CS_RUN_DIR/STOP"; }

# A STOP file this script wrote carries a first line naming the job, so a later attempt can tell it from a user's.
cs_own_stop_marker() { printf 'cellseg-slurm job=%s' "$CS_JOB_ID"; }

cs_on_signal() {
  local sig="$1"
  # Only the warning signals count as "the scheduler wants this job to stop": TERM also comes with scancel.
  if [[ $sig != TERM && -z $CS_SIGNAL ]]; then CS_SIGNAL="$sig"; fi
  cs_log "caught SIG$sig: asking the training loop to checkpoint and stop at its next step ($(cs_stop_file))"
  printf '%s restart=%s signal=%s time=%s\n' "$(cs_own_stop_marker)" "$CS_RESTART" "$sig" "$(date +%s)" \
    > "$(cs_stop_file)" 2>/dev/null || cs_log "WARNING: could not write $(cs_stop_file)"
}

cs_install_traps() {
  trap 'cs_on_signal USR1' USR1
  trap 'cs_on_signal USR2' USR2
  trap 'cs_on_signal TERM' TERM
}

cs_remove_traps() { trap - USR1 USR2 TERM; }

# Remove a STOP file this job wrote (an earlier attempt's that was never consumed, or this attempt's after the run
# ended). A user's STOP file (no tag) stays and is honoured.
cs_clear_own_stop() {
  local f; f="$(cs_stop_file)"
  if [[ -f $f ]] && head -n1 "$f" 2>/dev/null | grep -q "^$(cs_own_stop_marker) "; then
    rm -f "$f" && cs_log "removed this job's unconsumed STOP file $f"
  fi
}

# At the start of a training job: also remove a tagged STOP file whose job is gone (a job killed between writing it
# and the loop consuming it), so it cannot stop the next job of this RUN_DIR at its first step. A tagged file of a job
# still in the queue stays (two jobs sharing a RUN_DIR).
cs_clear_stale_stop() {
  cs_clear_own_stop
  local f id state; f="$(cs_stop_file)"
  [[ -f $f ]] || return 0
  id="$(head -n1 "$f" 2>/dev/null | sed -n 's/^cellseg-slurm job=\([^ ]*\) .*/\1/p')"
  [[ -n $id ]] || return 0
  if [[ $id == local-* ]]; then
    kill -0 "${id##*-}" 2>/dev/null && return 0
  else
    state="$(cs_squeue -h --jobs="$id" -o %T 2>/dev/null)"
    [[ -n $state ]] && return 0
  fi
  rm -f "$f" && cs_log "removed a STOP file left by job $id, which is no longer running"
}

# cs_deadline_args: when STOP_AT is not given, set it (papermill -r) to the job's end time minus the margin.
cs_deadline_args() {
  CS_EXTRA_ARGS=()
  if [[ -n ${CS_STOP_AT:-} ]]; then
    cs_log "STOP_AT given ($CS_STOP_AT): used as is; a stop it causes is not requeued"
    return 0
  fi
  [[ -n ${SLURM_JOB_ID:-} ]] || return 0
  local end margin="${CELLSEG_STOP_MARGIN:-300}" out
  end="$(cs_squeue -h --jobs="$SLURM_JOB_ID" -o %e 2>/dev/null | head -n1)"
  out="$("$CS_PY" -m cellseg.slurm_helpers stop-at --end-time "$end" --margin "$margin" 2>&1)" || cs_die "${out#cellseg slurm: }"
  if [[ -n $out ]]; then
    CS_DEADLINE="$out"
    CS_EXTRA_ARGS+=(-r STOP_AT "$out")
    cs_log "job ends $end: STOP_AT=$out ($(date -d "@$out" +%FT%T 2>/dev/null), ${margin}s before the end)"
  fi
}

# ---------------------------------------------------------------------------------------------------------------
# running notebooks
# ---------------------------------------------------------------------------------------------------------------
# cs_run_payload CMD...: run CMD in the background and wait for it, so the traps run while it works; sets CS_RC.
cs_run_payload() {
  "$@" &
  local pid=$!
  while true; do
    wait "$pid"
    CS_RC=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  wait "$pid" 2>/dev/null
  CS_RC=$?
}

# cs_rank_exec PAPERMILL_ARGS...: run the notebook for this process's rank (RANK from torchrun, else SLURM_PROCID).
# Rank 0 writes $CS_NB_OUT and streams cell output to the log; rank k writes <CS_NB_OUT minus .ipynb>.rank<k>.ipynb
# (CELLSEG_RANK_NOTEBOOKS=keep, default) or /dev/null (discard).
cs_rank_exec() {
  local rank="${RANK:-${SLURM_PROCID:-0}}" out extra=()
  if [[ $rank == 0 ]]; then
    out="$CS_NB_OUT"; extra=(--log-output)
  elif [[ ${CELLSEG_RANK_NOTEBOOKS:-keep} == discard ]]; then
    out=/dev/null
  else
    out="${CS_NB_OUT%.ipynb}.rank${rank}.ipynb"
  fi
  # Per job and rank, on node-local disk: the kernel's connection file and IPC sockets, and IPython's history
  # database (SQLite on a shared home fails when several kernels start at once). Short: socket paths are limited.
  local scratch="${TMPDIR:-/tmp}/cs-${SLURM_JOB_ID:-$$}-r$rank"
  export JUPYTER_RUNTIME_DIR="$scratch/rt" IPYTHONDIR="$scratch/ipython"
  mkdir -p "$JUPYTER_RUNTIME_DIR" "$IPYTHONDIR"
  # cellseg.kernels is papermill with kernels on IPC sockets (no "running over TCP without encryption" warnings).
  exec "${CS_PY:-python}" -m cellseg.kernels "$CS_NB_IN" "$out" -k "$CELLSEG_KERNEL" --cwd "$CELLSEG_ROOT" \
    --no-progress-bar --start-timeout "${CELLSEG_KERNEL_START_TIMEOUT:-300}" "${extra[@]}" "$@"
}

# cs_papermill NOTEBOOK LABEL ARGS...: run one notebook in this process (rank 0 only); sets CS_RC.
cs_papermill() {
  local notebook="$1" label="$2"; shift 2
  export CS_NB_IN="$CELLSEG_ROOT/notebooks/$notebook.ipynb"
  export CS_NB_OUT="$CS_JOB_DIR/$label.attempt$CS_RESTART.ipynb"
  cs_log "papermill notebooks/$notebook.ipynb -> $CS_NB_OUT $*"
  # One process: hide the allocation's task layout, or a job submitted with --ntasks>1 would make the notebook wait
  # for ranks that never come (cellseg.distributed reads SLURM_PROCID/SLURM_NTASKS and torchrun's RANK/WORLD_SIZE).
  cs_run_payload env -u SLURM_PROCID -u SLURM_NTASKS -u SLURM_NPROCS -u SLURM_LOCALID -u RANK -u WORLD_SIZE \
    -u LOCAL_RANK bash -c 'source "$CELLSEG_ROOT/slurm/common.sh" && cs_rank_exec "$@"' cellseg-rank "$@"
}

# cs_prepare_data ARGS...: run 00_prepare_data first when CELLSEG_PREPARE says so. auto: when the data cache is
# missing, or was prepared for other parameters (DATASET, DATA_ROOT, SEED, ...; cellseg.data.provenance compares
# manifest.json with the arguments), never merely because a manifest.json exists. The cache must fit afterwards.
cs_prepare_data() {
  local mode="${CELLSEG_PREPARE:-auto}" why rc
  case "$mode" in
    never) return 0 ;;
    auto)
      why="$("$CS_PY" -m cellseg.data.provenance --notebook 01_train -- "$@" 2>&1)"; rc=$?
      case $rc in
        0) cs_log "data cache $CS_DATA_CACHE is prepared for these parameters"; return 0 ;;
        3) cs_log "no prepared data cache at $CS_DATA_CACHE" ;;
        4) cs_log "the data cache $CS_DATA_CACHE was prepared for other parameters; re-preparing it: $why" ;;
        *) cs_die "cannot check the data cache $CS_DATA_CACHE: $why" ;;
      esac ;;
    always) ;;
    *) cs_die "CELLSEG_PREPARE must be auto, always or never, got '$mode'" ;;
  esac
  cs_log "preparing the data cache $CS_DATA_CACHE (CELLSEG_PREPARE=$mode)"
  cs_papermill 00_prepare_data 00_prepare_data "$@"
  [[ $CS_RC == 0 ]] || cs_finish_failed "data preparation failed (papermill exit $CS_RC; executed notebook $CS_NB_OUT)"
  why="$("$CS_PY" -m cellseg.data.provenance --notebook 01_train -- "$@" 2>&1)" \
    || cs_finish_failed "after preparation the data cache still does not fit the parameters: $why"
}

cs_finish_failed() {
  cs_log "FAILED: $1"
  exit "$CS_EXIT_FAILED"
}

# cs_conclude NOTEBOOK: judge the attempt from the marker, record it, then exit or requeue.
cs_conclude() {
  local notebook="$1" out
  out="$("$CS_PY" -m cellseg.slurm_helpers conclude --notebook "$notebook" \
      --status-file "${CS_JUDGE_STATUS_FILE-$CS_STATUS_FILE}" --expect-file "${CS_JUDGE_EXPECT_FILE:-}" \
      --since "$CS_ATTEMPT_START" --exit-code "$CS_RC" --signal "$CS_SIGNAL" ${CS_DEADLINE:+--deadline "$CS_DEADLINE"} \
      --job-id "${SLURM_JOB_ID:-}" --restart-count "$CS_RESTART" --max-requeues "${MAX_REQUEUES:-10}" \
      --attempts-file "$CS_ATTEMPTS" 2>&1)" || cs_die "could not judge the attempt: $out" "$CS_EXIT_FAILED"
  eval "$out"
  cs_clear_own_stop
  cs_log "$CS_MESSAGE"
  if [[ $CS_ACTION == requeue ]]; then
    cs_remove_traps  # scontrol requeue TERMinates this script: that must not write a new STOP file
    local err
    if err="$(scontrol requeue "$SLURM_JOB_ID" 2>&1)"; then
      cs_log "scontrol requeue $SLURM_JOB_ID accepted: the job goes back to PENDING and resumes from latest.pt"
      exit "$CS_EXIT_CODE"
    fi
    cs_log "scontrol requeue failed ($err): resubmit the same command to continue"
    exit "$CS_EXIT_STOPPED"
  fi
  exit "$CS_EXIT_CODE"
}

# cs_check_knobs: the environment-variable knobs, checked before anything runs.
cs_check_knobs() {
  case "${CELLSEG_PREPARE:-auto}" in auto|always|never) ;;
    *) cs_die "CELLSEG_PREPARE must be auto, always or never, got '${CELLSEG_PREPARE}'" ;; esac
  case "${CELLSEG_LAUNCHER:-srun}" in srun|torchrun) ;;
    *) cs_die "CELLSEG_LAUNCHER must be srun or torchrun, got '${CELLSEG_LAUNCHER}'" ;; esac
  case "${CELLSEG_RANK_NOTEBOOKS:-keep}" in keep|discard) ;;
    *) cs_die "CELLSEG_RANK_NOTEBOOKS must be keep or discard, got '${CELLSEG_RANK_NOTEBOOKS}'" ;; esac
  [[ ${MAX_REQUEUES:-10} =~ ^[0-9]+$ ]] \
    || cs_die "MAX_REQUEUES must be a whole number >= 0, got '${MAX_REQUEUES}' (e.g. MAX_REQUEUES=3 sbatch ...)"
  [[ ${CELLSEG_STOP_MARGIN:-300} =~ ^[0-9]+([.][0-9]+)?$ ]] \
    || cs_die "CELLSEG_STOP_MARGIN must be a number of seconds >= 0, got '${CELLSEG_STOP_MARGIN}'"
  [[ ${CELLSEG_KERNEL_START_TIMEOUT:-300} =~ ^[1-9][0-9]*$ ]] \
    || cs_die "CELLSEG_KERNEL_START_TIMEOUT must be a whole number of seconds > 0, got '${CELLSEG_KERNEL_START_TIMEOUT}'"
}

# cs_begin NOTEBOOK ARGS...: everything before the payload: root, env, parameters, job dir, traps.
cs_begin() {
  local notebook="$1"; shift
  CS_ATTEMPT_START="$(date +%s.%N)"
  cs_check_knobs
  export CELLSEG_ROOT
  CELLSEG_ROOT="$(cs_find_root)" || cs_die "cannot find the project root; set CELLSEG_ROOT"
  cd "$CELLSEG_ROOT" || cs_die "cannot cd to $CELLSEG_ROOT"
  cs_setup_env
  cs_resolve_run "$notebook" "$@"
  cs_job_dir
  cs_doctor "$notebook" "$@"
  if [[ -n ${SLURM_CPUS_PER_TASK:-} && -z ${OMP_NUM_THREADS:-} ]]; then export OMP_NUM_THREADS="$SLURM_CPUS_PER_TASK"; fi
}

# cs_train_job MODE ARGS...: one training phase (MODE single: one process; ddp: one papermill per rank).
cs_train_job() {
  local mode="$1"; shift
  cs_begin 01_train "$@"
  # Only training jobs turn signals into STOP files: an evaluation sharing the RUN_DIR must never stop a training.
  cs_install_traps
  cs_clear_stale_stop
  local args=("$@")
  if [[ $CS_RESTART != 0 && $CS_RESUME != auto ]]; then
    cs_log "restart $CS_RESTART: RESUME='$CS_RESUME' replaced by 'auto' so the requeued job continues from its own latest.pt"
    args+=(-r RESUME auto)
  fi
  cs_deadline_args
  args+=("${CS_EXTRA_ARGS[@]}")
  cs_prepare_data "$@"
  local label="01_train_phase$CS_PHASE"
  if [[ $mode == single ]]; then
    cs_papermill 01_train "$label" "${args[@]}"
  else
    cs_launch_ddp "$label" "${args[@]}"
  fi
  cs_conclude 01_train
}

# cs_launch_ddp LABEL ARGS...: every rank runs the notebook; srun (one task per GPU, default) or torchrun per node.
cs_launch_ddp() {
  local label="$1"; shift
  export CS_NB_IN="$CELLSEG_ROOT/notebooks/01_train.ipynb"
  export CS_NB_OUT="$CS_JOB_DIR/$label.attempt$CS_RESTART.ipynb"
  local first
  first="$(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname)}" 2>/dev/null | head -n1)"
  export MASTER_ADDR="${MASTER_ADDR:-${first:-$(hostname)}}"
  # Same convention as cellseg.distributed.detect_env, shifted by the restart count so a requeued attempt does not
  # meet the previous attempt's socket in TIME_WAIT.
  export MASTER_PORT="${MASTER_PORT:-$((20000 + (${SLURM_JOB_ID:-0} + CS_RESTART) % 20000))}"
  local ntasks="${SLURM_NTASKS:-1}" nnodes="${SLURM_NNODES:-1}" launcher="${CELLSEG_LAUNCHER:-srun}"
  [[ -z ${OMP_NUM_THREADS:-} ]] && export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
  local rank_cmd=(bash -c 'source "$CELLSEG_ROOT/slurm/common.sh" && cs_rank_exec "$@"' cellseg-rank "$@")
  case "$launcher" in
    srun)
      local cpt=()
      [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && cpt=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
      cs_log "DDP: srun $ntasks tasks on $nnodes node(s), master $MASTER_ADDR:$MASTER_PORT -> $CS_NB_OUT (rank 0)"
      cs_run_payload srun --label --kill-on-bad-exit=1 --ntasks="$ntasks" "${cpt[@]}" "${rank_cmd[@]}"
      ;;
    torchrun)
      local nproc=$(( ntasks / nnodes ))
      (( nproc >= 1 )) || cs_die "torchrun launcher: SLURM_NTASKS=$ntasks over $nnodes nodes gives no process per node"
      cs_log "DDP: torchrun on $nnodes node(s) x $nproc processes, rendezvous $MASTER_ADDR:$MASTER_PORT -> $CS_NB_OUT (rank 0)"
      cs_run_payload srun --label --kill-on-bad-exit=1 --ntasks="$nnodes" --ntasks-per-node=1 \
        --cpus-per-task="$(( ${SLURM_CPUS_PER_TASK:-1} * nproc ))" \
        torchrun --nnodes="$nnodes" --nproc-per-node="$nproc" --rdzv-backend=c10d \
        --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="${SLURM_JOB_ID:-cellseg}" --no-python "${rank_cmd[@]}"
      ;;
    *) cs_die "CELLSEG_LAUNCHER must be srun or torchrun, got '$launcher'" ;;
  esac
}

# cs_eval_job ARGS...: evaluation (one process); finished when papermill exits 0 and metrics.json is new.
cs_eval_job() {
  cs_begin 02_evaluate "$@"
  cs_papermill 02_evaluate 02_evaluate "$@"
  CS_JUDGE_STATUS_FILE="" CS_JUDGE_EXPECT_FILE="$CS_METRICS_FILE" cs_conclude 02_evaluate
}
