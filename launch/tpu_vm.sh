#!/usr/bin/env bash
# Cloud TPU VM slices for llama4_jax: create, install, run on every worker, logs, stop, delete.
#
#   launch/tpu_vm.sh [--dry-run] COMMAND --name=NAME --zone=ZONE [options] [-- train flags]
#
# Commands:
#   create   --tpu=v5p-256 [--queued] [--spot] [--runtime=VERSION]   a TPU VM slice (or a queued resource)
#   status                                                          the slice (or queued resource) state
#   install  [--src=DIR] [--bucket=BUCKET]                          copy DIR (default: this checkout) to
#            every worker, make a venv, pip install it with jax[tpu]; --bucket mounts gs://BUCKET at
#            /gcs/BUCKET on every worker (gcsfuse), for readers that need a POSIX path (ArrayRecord
#            data); the workdir, tokenizer and other data take gs:// URLs directly
#   run      --config=FILE --workdir=DIR [-- --config.x=y ...]     start training on all workers (detached;
#            jax.distributed finds the other workers from the TPU metadata); logs to ~/llama4_jax.log
#   logs     [--worker=0]                                           follow one worker's log (all: every one)
#   stop                                                            SIGTERM the trainers: each saves a
#            checkpoint and exits, so a later `run` resumes
#   delete   [--queued]                                             delete the slice (and queued resource)
#
# Options: --project=P (default: gcloud's), --dry-run prints every command instead of running it.
# Requires gcloud (https://cloud.google.com/sdk) authenticated for the project.
set -euo pipefail

usage() {
  sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"

dry_run=0
command=""
name="" zone="" tpu="" runtime="" project="" src="" bucket="" config="" workdir="" worker="0"
queued=0 spot=0
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --tpu=*) tpu="${1#*=}" ;;
    --runtime=*) runtime="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --src=*) src="${1#*=}" ;;
    --bucket=*) bucket="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --worker=*) worker="${1#*=}" ;;
    --queued) queued=1 ;;
    --spot) spot=1 ;;
    -h | --help) usage ;;
    --) shift; extra=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *)
      [[ -z "$command" ]] || die "one command at a time; got '$command' and '$1'"
      command="$1" ;;
  esac
  shift
done
[[ -n "$command" ]] || usage
[[ -n "$name" ]] || die "--name=NAME is required (the TPU VM's name)"
[[ -n "$zone" ]] || die "--zone=ZONE is required (e.g. us-east5-a for v5p)"

gcloud_args=(--zone="$zone")
[[ -n "$project" ]] && gcloud_args+=(--project="$project")

# All workers of the slice run the same shell command.
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_args[@]}" --worker=all --command="$1"
}

default_runtime() {
  case "$1" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5e-* | v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "--tpu=$1: expected v4-N, v5e-N (v5litepod-N), v5p-N or v6e-N" ;;
  esac
}

case "$command" in
  create)
    [[ -n "$tpu" ]] || die "create needs --tpu=TYPE (e.g. v5p-256); size it with: python -m llama4_jax.plan --config=FILE --tpu=TYPE"
    runtime="${runtime:-$(default_runtime "$tpu")}"
    spot_flag=()
    [[ $spot == 1 ]] && spot_flag=(--spot)
    if [[ $queued == 1 ]]; then
      run gcloud compute tpus queued-resources create "$name" "${gcloud_args[@]}" --node-id="$name" \
        --accelerator-type="$tpu" --runtime-version="$runtime" "${spot_flag[@]}"
      echo "# queued; watch it with: launch/tpu_vm.sh status --name=$name --zone=$zone --queued" >&2
    else
      run gcloud compute tpus tpu-vm create "$name" "${gcloud_args[@]}" --accelerator-type="$tpu" \
        --version="$runtime" "${spot_flag[@]}"
    fi
    ;;
  status)
    if [[ $queued == 1 ]]; then
      run gcloud compute tpus queued-resources describe "$name" "${gcloud_args[@]}"
    else
      run gcloud compute tpus tpu-vm describe "$name" "${gcloud_args[@]}"
    fi
    ;;
  install)
    src="${src:-$(cd "$(dirname "$0")/.." && pwd)}"
    [[ -f "$src/pyproject.toml" ]] || die "--src=$src is not a llama4_jax checkout (no pyproject.toml)"
    archive="${TMPDIR:-/tmp}/llama4_jax_src.tgz"
    run tar -czf "$archive" -C "$src" --exclude=.venv --exclude=workdir --exclude=.git \
      --exclude=__pycache__ .
    run gcloud compute tpus tpu-vm scp "$archive" "$name:llama4_jax_src.tgz" "${gcloud_args[@]}" --worker=all
    on_all_workers "set -e; rm -rf ~/llama4_jax && mkdir -p ~/llama4_jax && tar -xzf ~/llama4_jax_src.tgz -C ~/llama4_jax && (python3 -m venv ~/llama4_jax/.venv || (sudo apt-get update -q && sudo apt-get install -y -q python3-venv && python3 -m venv ~/llama4_jax/.venv)) && ~/llama4_jax/.venv/bin/pip install -q -e ~/llama4_jax[tpu] && ~/llama4_jax/.venv/bin/python -c 'import jax; print(jax.devices())'"
    if [[ -n "$bucket" ]]; then
      on_all_workers "set -e; if ! command -v gcsfuse >/dev/null; then echo \"deb https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /etc/apt/trusted.gpg.d/gcsfuse.asc >/dev/null && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; fi; sudo mkdir -p /gcs/$bucket && sudo chown \$USER /gcs/$bucket && (mountpoint -q /gcs/$bucket || gcsfuse --implicit-dirs $bucket /gcs/$bucket)"
    fi
    ;;
  run)
    [[ -n "$config" ]] || die "run needs --config=FILE (relative to the checkout, e.g. configs/scout_v5p256.py)"
    [[ -n "$workdir" ]] || die "run needs --workdir=DIR, shared by all workers (e.g. gs://BUCKET/scout)"
    flags=""
    for f in "${extra[@]+"${extra[@]}"}"; do flags+=" $(printf '%q' "$f")"; done
    on_all_workers "cd ~/llama4_jax && LLAMA4_JAX_DISTRIBUTED=auto nohup .venv/bin/python -m llama4_jax.train --config=$(printf '%q' "$config") --workdir=$(printf '%q' "$workdir")$flags > ~/llama4_jax.log 2>&1 < /dev/null &"
    echo "# started on every worker; follow it with: launch/tpu_vm.sh logs --name=$name --zone=$zone" >&2
    ;;
  logs)
    run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_args[@]}" --worker="$worker" \
      --command="tail -n 200 -F ~/llama4_jax.log"
    ;;
  stop)
    # ([l]: the pattern does not match this pkill's own command line)
    on_all_workers "pkill -TERM -f '[l]lama4_jax.train' || true"
    echo "# SIGTERM sent: each worker saves the step's checkpoint, then exits" >&2
    ;;
  delete)
    if [[ $queued == 1 ]]; then
      run gcloud compute tpus queued-resources delete "$name" "${gcloud_args[@]}" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$name" "${gcloud_args[@]}" --quiet
    fi
    ;;
  *) die "unknown command '$command' (create, status, install, run, logs, stop, delete)" ;;
esac
