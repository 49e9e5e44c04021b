#!/usr/bin/env bash
# The CUDA path end to end on a machine with one GPU: what a user runs, then the benchmarks.
#
#   bash bench/gpu.sh [OUT_DIR] [cli|bench|all]     # default: runs/gpu_check all
#
# cli (about 4 minutes at most, each step's limit included):
#   `workbench fit` of the default config (auto_precision picks bf16-mixed on the GPU);
#   `workbench predict` of its best checkpoint on the embedded scene on the GPU in float32 and
#   bf16 and on the CPU, and the share of pixels where the class maps agree;
#   one epoch under configs/trainer/fsdp.yaml (Lightning's FSDPStrategy, one GPU), then predict
#   with its gathered checkpoint.
# bench (about 7 minutes at most): bench/train.py and bench/predict.py on cuda (samples/s, px/s,
#   torch.cuda.max_memory_allocated), then one epoch with `compile_model: true`.
# Each step has its own time limit and the script goes on after a failure; the log says which failed.
# Not yet run on a GPU: the one lease this project had ended before it finished.
set -u
out=${1:-runs/gpu_check}
part=${2:-all}
mkdir -p "$out"
py=$(command -v python || command -v python3)  # images with only python3 (a venv's) work too
wb="$py -m workbench.cli"
scene="${WORKBENCH_CACHE:-$HOME/.cache/workbench}/sentinel2_water/s2_chesapeake_hls6.tif"
status=0

step() {  # step NAME SECONDS COMMAND...: run one step, print its time and exit status
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "=== $name"
    timeout "$limit" "$@"
    rc=$?
    echo "=== $name: rc $rc, $((SECONDS - start)) s"
    [ "$rc" = 0 ] || status=1
}

best() {  # best checkpoint of the newest run under folder $1
    "$py" -c "import json, sys; print(json.load(open(sys.argv[1]))['best_checkpoint'])" \
        "$(ls -td "$1"/*/version_*/ | head -1)results.json"
}

agree() {  # share of pixels where two class GeoTIFFs agree
    "$py" - "$@" <<'EOF'
import sys
import rasterio
a, b = (rasterio.open(p).read(1) for p in sys.argv[1:3])
print(f"agreement {sys.argv[1]} vs {sys.argv[2]}: {(a == b).mean():.5f} of {a.size} px")
EOF
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

if [ "$part" != bench ]; then
step fit 60 $wb fit --config configs/flood_lora.yaml --trainer.logger.init_args.save_dir "$out/fit"
"$py" -c "import json, sys; d = json.load(open(sys.argv[1])); print({k: d[k] for k in ('precision', 'device', 'step_time_s', 'samples_per_s', 'peak_memory_mib', 'peak_memory_kind')}, 'test', d['test'])" \
    "$(ls -td "$out"/fit/*/version_*/ | head -1)results.json"
ckpt=$(best "$out/fit")
for how in "cuda 32" "cuda bf16" "cpu 32"; do
    set -- $how
    step "predict $1 $2" 30 $wb predict --config configs/flood_lora.yaml --ckpt_path "$ckpt" --inputs "$scene" \
        --device "$1" --precision "$2" --output_dir "$out/predict_$1_$2" --quicklook false
done
map=$(basename "$scene" .tif)
for other in cuda_bf16 cpu_32; do
    agree "$out/predict_cuda_32/$map"*class*.tif "$out/predict_$other/$map"*class*.tif
done

step fsdp 60 $wb fit --config configs/flood_lora.yaml --trainer configs/trainer/fsdp.yaml --trainer.devices 1 \
    --trainer.max_epochs 1 --trainer.logger.init_args.save_dir "$out/fsdp"
step "predict fsdp checkpoint" 30 $wb predict --config configs/flood_lora.yaml --ckpt_path "$(best "$out/fsdp")" \
    --inputs "$scene" --device cuda --output_dir "$out/predict_fsdp" --quicklook false
fi

if [ "$part" != cli ]; then
step "bench/train.py" 120 "$py" bench/train.py --device cuda --sizes 100m 300m --strategies full lora frozen \
    --checkpointing off --batch_size 16 --steps 8 --precision bf16
step "bench/train.py checkpointing" 30 "$py" bench/train.py --device cuda --sizes 300m --strategies full \
    --checkpointing on --batch_size 16 --steps 8 --precision bf16
step "bench/train.py fp32" 30 "$py" bench/train.py --device cuda --sizes 100m --strategies full \
    --checkpointing off --batch_size 16 --steps 8 --precision fp32
step "bench/predict.py" 150 "$py" bench/predict.py --device cuda --sizes 2048 8192 --backbones small 100m \
    --batch_size 32 --precision bf16

step compile 90 $wb fit --config configs/flood_lora.yaml --model.init_args.compile_model true --trainer.max_epochs 1 \
    --trainer.logger.init_args.save_dir "$out/compile"
fi
exit $status
