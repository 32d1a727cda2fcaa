#!/usr/bin/env bash
# llama4_jax training on a GKE TPU node pool as a JobSet (launch/jobset.yaml.tmpl).
#
#   launch/gke_jobset.sh [--dry-run] COMMAND --name=NAME [options] [-- train flags]
#
# Commands:
#   render  --tpu=v5p-256 --image=IMAGE --bucket=BUCKET --config=FILE [--run=DIR] [--max-restarts=N]
#           print the manifest (topology, hosts and chips per host from the TPU type)
#   apply   (same options) render and `kubectl apply` it
#   logs    follow the first pod's log
#   delete  delete the JobSet
#
# The workdir is gs://BUCKET/RUN (RUN defaults to NAME), written by the trainer directly; the bucket is
# also mounted at /gcs/BUCKET in every pod for readers that need a POSIX path (ArrayRecord data). --dry-run
# prints the kubectl commands instead of running them. Requires kubectl pointed at a cluster with the
# JobSet controller and a TPU node pool of the right type.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=launch/lib.sh
source "$here/lib.sh"

dry_run=0
command="" name="" tpu="" image="" bucket="" config="" run_dir="" max_restarts=3
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --name=*) name="${1#*=}" ;;
    --tpu=*) tpu="${1#*=}" ;;
    --image=*) image="${1#*=}" ;;
    --bucket=*) bucket="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --run=*) run_dir="${1#*=}" ;;
    --max-restarts=*) max_restarts="${1#*=}" ;;
    -h | --help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
    --) shift; extra=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *)
      [[ -z "$command" ]] || die "one command at a time; got '$command' and '$1'"
      command="$1" ;;
  esac
  shift
done
[[ -n "$command" ]] || die "a command is required: render, apply, logs or delete (see --help)"
[[ "$name" =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name='$name' must be a lowercase DNS label (letters, digits, '-'), as Kubernetes requires"

# Sets accelerator, topology, hosts and chips_per_host for a TPU type (v5p/v4 count TensorCores).
slice_shape() {
  local gen="${1%-*}" count="${1##*-}" chips
  [[ "$count" =~ ^[0-9]+$ ]] || die "--tpu=$1: expected TYPE-COUNT such as v5p-256 or v6e-64"
  case "$gen" in
    v4 | v5p)
      chips=$((count / 2))
      accelerator=$([[ $gen == v4 ]] && echo tpu-v4-podslice || echo tpu-v5p-slice)
      case "$chips" in
        4) topology=2x2x1 ;; 8) topology=2x2x2 ;; 16) topology=2x2x4 ;; 32) topology=2x4x4 ;;
        64) topology=4x4x4 ;; 128) topology=4x4x8 ;; 256) topology=4x8x8 ;; 512) topology=8x8x8 ;;
        1024) topology=8x8x16 ;; 2048) topology=8x16x16 ;; 4096) topology=16x16x16 ;;
        *) die "--tpu=$1: no standard $gen topology with $chips chips" ;;
      esac ;;
    v5e | v5litepod | v6e)
      chips=$count
      accelerator=$([[ $gen == v6e ]] && echo tpu-v6e-slice || echo tpu-v5-lite-podslice)
      case "$chips" in
        1) topology=1x1 ;; 4) topology=2x2 ;; 8) topology=2x4 ;; 16) topology=4x4 ;; 32) topology=4x8 ;;
        64) topology=8x8 ;; 128) topology=8x16 ;; 256) topology=16x16 ;;
        *) die "--tpu=$1: no standard $gen topology with $chips chips" ;;
      esac ;;
    *) die "--tpu=$1: expected v4-N, v5e-N, v5p-N or v6e-N" ;;
  esac
  local single=4  # chips on one host: 4 for v4/v5p, up to 8 for v5e/v6e; multi-host slices have 4 per host
  [[ $gen == v4 || $gen == v5p ]] || single=8
  if ((chips <= single)); then
    hosts=1 chips_per_host=$chips
  else
    hosts=$((chips / 4)) chips_per_host=4
  fi
}

render() {
  [[ -n "$tpu" ]] || die "--tpu=TYPE is required (e.g. v5p-256); size it with python -m llama4_jax.plan"
  [[ -n "$image" ]] || die "--image=IMAGE is required (build it with launch/Dockerfile)"
  [[ -n "$bucket" ]] || die "--bucket=BUCKET is required (the workdir is gs://BUCKET/RUN)"
  [[ -n "$config" ]] || die "--config=FILE is required (e.g. configs/scout_v5p256.py)"
  slice_shape "$tpu"
  local extra_args="" f text
  for f in "${extra[@]+"${extra[@]}"}"; do extra_args+=", \"${f//\"/\\\"}\""; done
  text="$(cat "$here/jobset.yaml.tmpl")"
  local -A values=([NAME]="$name" [IMAGE]="$image" [BUCKET]="$bucket" [CONFIG]="$config"
                   [RUN]="${run_dir:-$name}" [ACCELERATOR]="$accelerator" [TOPOLOGY]="$topology"
                   [HOSTS]="$hosts" [CHIPS_PER_HOST]="$chips_per_host" [MAX_RESTARTS]="$max_restarts"
                   [EXTRA_ARGS]="$extra_args")
  local key
  for key in "${!values[@]}"; do
    text="${text//\$\{$key\}/${values[$key]}}"
  done
  if [[ "$text" =~ \$\{[A-Z_]+\} ]]; then
    die "template placeholder ${BASH_REMATCH[0]} has no value"
  fi
  printf '%s\n' "$text"
}

case "$command" in
  render) render ;;
  apply)
    manifest="$(render)"
    if [[ $dry_run == 1 ]]; then
      echo "kubectl apply -f - <<'YAML'"
      printf '%s\n' "$manifest"
      echo "YAML"
    else
      printf '%s\n' "$manifest" | kubectl apply -f -
    fi ;;
  logs) run kubectl logs -f "jobs/$name-slice-0" --all-containers --max-log-requests=1 ;;
  delete) run kubectl delete jobset "$name" ;;
  *) die "unknown command '$command' (render, apply, logs, delete)" ;;
esac
