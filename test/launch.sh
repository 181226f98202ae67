#!/usr/bin/env bash
# The one implementation behind test/train_clip_*.sh. Each of those scripts is a single line that runs
#   bash test/launch.sh PROFILE "$@"
# PROFILE (full_1p, performance_1p, full_8p, performance_8p, cluster) sets the recipe's defaults; the user's flags
# set the rest. Every case, one card included, is the same torch.distributed.run command, so 1p, 8p and multi-node
# runs cannot drift apart. Run any launcher with --help for the flags.
set -uo pipefail

start_time=$(date +%s)
test_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(dirname "$test_dir")
PY=${PYTHON:-python3}

# The recipe's checkpoint cadence, one place for each: a 1-card run never saves before the end (150000),
# multi-card runs every 15000 steps. --save_steps=N overrides.
SAVE_STEPS_1P=150000
SAVE_STEPS_MULTI=15000

profile=${1:-}
shift || true
case $profile in
  full_1p) kind=acc default_nproc=1 epochs=3 multi=0 ;;
  performance_1p) kind=perf default_nproc=1 epochs=1 multi=0 ;;
  full_8p) kind=acc default_nproc=8 epochs=3 multi=1 ;;
  performance_8p) kind=perf default_nproc=8 epochs=1 multi=1 ;;
  cluster) kind=acc default_nproc=8 epochs=3 multi=1 ;;
  *)
    echo "[Error] test/launch.sh is run by test/train_clip_*.sh (got profile '$profile')" >&2
    exit 1
    ;;
esac

usage() {
  local cluster_flags=""
  [ "$profile" = cluster ] && cluster_flags=" --nnodes=N --node_rank=R --master_addr=ADDR [--master_port=29500]"
  cat <<EOF
usage: bash test/train_clip_${profile}.sh --data_path=COCO_DIR --model_path=CLIP_ROBERTA_DIR${cluster_flags} [flags]
       bash test/train_clip_${profile}.sh --demo [flags]      (tiny embedded data and model, built locally)

  --data_path=DIR         COCO 2017 folder (annotations/ and train2017/, val2017/ as zips or folders)
  --model_path=DIR        the clip-roberta folder (save_clip_roberta.py makes it)
  --batch_size=64         per device, train and eval
  --train_epochs=$epochs
  --model_name=clip       network name in the summary and its CaseName
  --nproc_per_node=$default_nproc      processes on this node; 'auto' = the NPUs, else GPUs, present (1 on CPU)
  --nnodes=1 --node_rank=0 --master_addr=127.0.0.1 --master_port=PORT   (multi-node; every node runs the same line)
  --max_steps=N           stop after N optimizer steps (performance scripts: 1000)
  --demo                  use the embedded demo data and model (made once, cached in \$CLIP_DEMO_ROOT)
  --dry_run               print the device family and the launch command, then exit
  any other --flag=value or --flag value goes to run_clip.py and wins over the launcher's default,
  e.g. --output_dir=DIR --save_steps=500 --learning_rate=1e-4 --overwrite_output_dir

Environment: ASCEND_DEVICE_ID (0) names the output folder and the 1-card device; OUTPUT_ROOT (test/output);
PYTHON (python3). Logs and the summary go to \$OUTPUT_ROOT/\$ASCEND_DEVICE_ID/.
EOF
}

die_usage() {
  echo "[Error] $1" >&2
  usage >&2
  exit 1
}

die() {
  echo "[Error] $1" >&2
  exit 1
}

# run_clip.py's arguments: an ordered table, so the user's flags replace the launcher's defaults in place
# instead of relying on "last one wins". Values are kept joined by the unit separator (\x1f) to allow nargs>1.
US=$'\x1f'
declare -a arg_order=()
declare -A arg_vals=() arg_count=()

set_arg_joined() { # NAME COUNT JOINED_VALUES
  [[ -v "arg_count[$1]" ]] || arg_order+=("$1")
  arg_count[$1]=$2
  arg_vals[$1]=$3
}

set_arg() { # NAME [VALUE...]
  local name=$1
  shift
  local IFS=$US
  set_arg_joined "$name" $# "$*"
}

get_arg() { # NAME -> first value (empty when absent or bare)
  [[ -v "arg_count[$1]" ]] || return 0
  printf '%s' "${arg_vals[$1]%%"$US"*}"
}

# ---- 1. the user's flags -------------------------------------------------------------------------------------
demo=0 dry_run=0
opt_data_path="" opt_model_path="" opt_batch_size=64 opt_train_epochs=$epochs opt_model_name=clip
opt_nnodes=1 opt_node_rank=0 opt_master_addr=127.0.0.1 opt_master_port="" opt_nproc_per_node=$default_nproc
declare -A given=()
declare -a passthrough=() # records NAME US COUNT US JOINED, applied after the defaults

while (($#)); do
  token=$1
  shift
  case $token in
    -h | --help)
      usage
      exit 0
      ;;
    --?*) ;;
    *) die_usage "unexpected argument '$token': flags are --name=value or --name value" ;;
  esac
  name=${token#--}
  values=()
  [[ ${name%%=*} =~ ^[A-Za-z][A-Za-z0-9_.@-]*$ ]] || die_usage "'$token' is not a flag name"
  if [[ $name == *=* ]]; then
    values=("${name#*=}")
    name=${name%%=*}
  else
    while (($#)) && [[ $1 != --* ]]; do
      values+=("$1")
      shift
    done
  fi
  case $name in
    demo | dry_run)
      ((${#values[@]} == 0)) || die_usage "--$name takes no value"
      printf -v "$name" 1
      ;;
    data_path | model_path | batch_size | train_epochs | model_name | nnodes | node_rank | master_addr | master_port | nproc_per_node)
      ((${#values[@]} == 1)) || die_usage "--$name needs one value, as --$name=VALUE"
      printf -v "opt_$name" '%s' "${values[0]}"
      given[$name]=1
      ;;
    *)
      joined=$(
        IFS=$US
        printf '%s' "${values[*]}"
      )
      passthrough+=("$name$US${#values[@]}$US$joined")
      ;;
  esac
done

is_uint() { [[ $1 =~ ^(0|[1-9][0-9]*)$ ]]; } # no leading zeros: bash arithmetic would read them as octal
is_uint "$opt_batch_size" && ((opt_batch_size > 0)) || die_usage "--batch_size must be a positive integer (got '$opt_batch_size')"
[[ $opt_train_epochs =~ ^[0-9]*\.?[0-9]+$ ]] || die_usage "--train_epochs must be a number (got '$opt_train_epochs')"
is_uint "$opt_nnodes" && ((opt_nnodes > 0)) || die_usage "--nnodes must be a positive integer (got '$opt_nnodes')"
is_uint "$opt_node_rank" && ((opt_node_rank < opt_nnodes)) ||
  die_usage "--node_rank must be 0..$((opt_nnodes - 1)) for --nnodes=$opt_nnodes (got '$opt_node_rank')"
[ -z "$opt_master_port" ] || is_uint "$opt_master_port" || die_usage "--master_port must be a port number (got '$opt_master_port')"
[ "$opt_nproc_per_node" = auto ] || { is_uint "$opt_nproc_per_node" && ((opt_nproc_per_node > 0)); } ||
  die_usage "--nproc_per_node must be a positive integer or 'auto' (got '$opt_nproc_per_node')"
if [ "$profile" = cluster ]; then
  for flag in nnodes node_rank master_addr; do
    [[ -v "given[$flag]" ]] || die_usage "train_clip_cluster.sh needs --$flag (the same line on every node, its own --node_rank)"
  done
fi
device_id=${ASCEND_DEVICE_ID:-0}
is_uint "$device_id" || die "ASCEND_DEVICE_ID must be a device number (got '$device_id')"
output_root=${OUTPUT_ROOT:-$test_dir/output}

command -v "$PY" >/dev/null || die "no python at '$PY': put python3 on PATH or set PYTHON=/path/to/python"
export PYTHONPATH="$repo_dir${PYTHONPATH:+:$PYTHONPATH}" # clip_train.* for the helpers below
export PYTHONUNBUFFERED=1                                # the tee'd log follows the run live

if ((demo)) && { [ -z "$opt_data_path" ] || [ -z "$opt_model_path" ]; }; then
  demo_out=$("$PY" -m clip_train.demo --print-paths) || die "building the demo data/model failed (see above)"
  while IFS= read -r line; do
    case $line in
      data_dir=*) [ -n "$opt_data_path" ] || opt_data_path=${line#data_dir=} ;;
      model_dir=*) [ -n "$opt_model_path" ] || opt_model_path=${line#model_dir=} ;;
    esac
  done <<<"$demo_out"
fi
[ -n "$opt_data_path" ] || die_usage "--data_path is required (or --demo)"
[ -n "$opt_model_path" ] || die_usage "--model_path is required (or --demo)"
[ -d "$opt_data_path" ] || die "--data_path=$opt_data_path is not a directory: point it at the COCO 2017 folder"
[ -d "$opt_model_path" ] ||
  die "--model_path=$opt_model_path is not a directory: point it at the clip-roberta folder (python3 save_clip_roberta.py makes one)"

# ---- 2. the device family ------------------------------------------------------------------------------------
# env_npu.sh first: torch_npu cannot load before the CANN libraries are on the path. Without CANN it does nothing.
set +u
# shellcheck source=test/env_npu.sh
source "$test_dir/env_npu.sh"
set -u
# The last line of the probe is the answer; torch_npu may print notices before it.
probe=$(
  "$PY" - <<'EOF' | tail -n 1
import sys

try:
    import torch_npu  # noqa: F401  (registers torch.npu)
    import torch

    if torch.npu.device_count() > 0:
        print("npu", torch.npu.device_count())
        sys.exit()
except ImportError:
    pass
except Exception as exc:  # torch_npu present but broken: say so, then fall back
    print(f"[Warning] torch_npu did not load ({exc}); looking for GPUs instead", file=sys.stderr)
import torch

if torch.cuda.is_available():
    print("cuda", torch.cuda.device_count())
else:
    print("cpu", 0)
EOF
)
read -r family ndev <<<"$probe"
case $family in
  npu | cuda | cpu) ;;
  *) die "could not import torch with $PY: install requirements.txt, or set PYTHON to the python that has torch" ;;
esac

nproc=$opt_nproc_per_node
[ "$nproc" = auto ] && nproc=$((ndev > 0 ? ndev : 1))
if [ "$family" != cpu ]; then
  ((nproc <= ndev)) || die "--nproc_per_node=$nproc but this node has $ndev ${family^^} device(s): use --nproc_per_node=auto"
fi
world=$((opt_nnodes * nproc))
if ((world == 1)) && [ "$family" != cpu ]; then
  ((device_id < ndev)) || die "ASCEND_DEVICE_ID=$device_id but this node has $ndev ${family^^} device(s)"
fi

if [ "$family" = npu ]; then # collective-communication settings for HCCL, on Ascend hosts only
  export HCCL_WHITELIST_DISABLE=1
  export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
  export HCCL_EXEC_TIMEOUT=${HCCL_EXEC_TIMEOUT:-1200}
  if ((opt_nnodes > 1)) && [ -z "${HCCL_IF_IP:-}" ]; then
    # The address this node uses to reach the master is the one the other nodes can reach it on.
    HCCL_IF_IP=$(ip route get "$opt_master_addr" 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p')
    [ -n "$HCCL_IF_IP" ] || HCCL_IF_IP=$(hostname -I | awk '{print $1}')
    export HCCL_IF_IP
  fi
fi

master_port=$opt_master_port
if [ -z "$master_port" ]; then
  # One node: any free port, so several 1-card runs can share a host. Several nodes must agree on one.
  if ((opt_nnodes == 1)); then
    master_port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  else
    master_port=29500
  fi
fi

cores=$(nproc 2>/dev/null || echo 1)
workers=$((cores / nproc))
((workers > 8)) && workers=8
((workers < 1)) && workers=1

# ---- 3. run_clip.py's arguments: the recipe's, then the user's -----------------------------------------------
set_arg output_dir "$output_root/$device_id/ckpt"
set_arg num_train_epochs "$opt_train_epochs"
set_arg model_name_or_path "$opt_model_path"
set_arg data_dir "$opt_data_path"
set_arg dataset_name ydshieh/coco_dataset_script
set_arg dataset_config_name 2017
# On CPU run_clip.py picks the loader workers itself: none with the image cache (they would take cores from the
# model's threads), one per core when decoding on the fly.
[ "$family" = cpu ] || set_arg dataloader_num_workers "$workers"
set_arg image_column image_path
set_arg caption_column caption
set_arg remove_unused_columns False
set_arg do_train
set_arg do_eval
set_arg fp16
set_arg dataloader_drop_last
set_arg fp16_opt_level O2
set_arg loss_scale 12800000
set_arg optim adamw_apex_fused_npu
set_arg use_combine_grad
set_arg per_device_train_batch_size "$opt_batch_size"
set_arg per_device_eval_batch_size "$opt_batch_size"
set_arg learning_rate 5e-5
set_arg warmup_steps 0
set_arg weight_decay 0.1
set_arg skip_steps 10
# The demo's towers start from random weights: they need a larger step than the recipe's pretrained ones. Its
# output is disposable: a rerun starts fresh instead of being refused as a finished run.
((demo)) && set_arg learning_rate 5e-4 && set_arg logging_steps 10 && set_arg overwrite_output_dir
if ((multi)); then
  set_arg save_steps "$SAVE_STEPS_MULTI"
  set_arg ddp_bucket_cap_mb 150
else
  set_arg save_steps "$SAVE_STEPS_1P"
fi
[ "$kind" = perf ] && set_arg max_steps 1000
((world == 1)) && [ "$family" != cpu ] && set_arg device_id "$device_id"
# transformers 5 sets up DDP on a CPU-only host only with use_cpu; without it each process trains alone.
[ "$family" = cpu ] && set_arg use_cpu
for record in "${passthrough[@]}"; do
  name=${record%%"$US"*} rest=${record#*"$US"}
  set_arg_joined "$name" "${rest%%"$US"*}" "${rest#*"$US"}"
done

run_args=()
for name in "${arg_order[@]}"; do
  run_args+=("--$name")
  rest=${arg_vals[$name]}
  for ((i = 0; i < arg_count[$name]; i++)); do
    run_args+=("${rest%%"$US"*}")
    rest=${rest#*"$US"}
  done
done

out_dir=$(get_arg output_dir)
batch_size=$(get_arg per_device_train_batch_size)
case_name="${opt_model_name}_bs${batch_size}_${world}p_${kind}"
log_dir="$output_root/$device_id"
log_file="$log_dir/train_$device_id.log"
summary_file="$log_dir/$case_name.log"

launch=("$PY" -m torch.distributed.run --nproc_per_node "$nproc" --nnodes "$opt_nnodes" --node_rank "$opt_node_rank"
  --master_addr "$opt_master_addr" --master_port "$master_port" "$repo_dir/run_clip.py" "${run_args[@]}")

if ((dry_run)); then
  echo "family=$family devices=$ndev world_size=$world"
  env | grep '^HCCL_' | sort | sed 's/^/env: /'
  echo "log=$log_file"
  echo "summary=$summary_file"
  printf 'command:'
  printf ' %q' "${launch[@]}"
  echo
  exit 0
fi

# ---- 4. train, tee the log, then (node 0 only) the summary -----------------------------------------------------
mkdir -p "$log_dir" || die "cannot create $log_dir: set OUTPUT_ROOT to a writable folder"
rm -f "$summary_file" # a failed run must not leave the previous run's figures looking current

train_and_summarise() {
  echo "[launch] $profile on $family: node $opt_node_rank of $opt_nnodes, $nproc process(es) here, world size $world"
  printf '[launch] command:'
  printf ' %q' "${launch[@]}"
  echo
  "${launch[@]}"
  local rc=$?
  if ((rc != 0)); then
    echo "[Error] training exited with status $rc; the whole log is $log_file"
    return "$rc"
  fi
  ((opt_node_rank == 0)) || return 0
  "$PY" -m clip_train.summary --results_dir "$out_dir" --summary_file "$summary_file" \
    --network "$opt_model_name" --rank_size "$world" --batch_size "$batch_size" --device_type "$(uname -m)" \
    --case_name "$case_name" --started_at "$start_time" --e2e_seconds "$(($(date +%s) - start_time))"
}

train_and_summarise 2>&1 | tee "$log_file"
exit "${PIPESTATUS[0]}"
