#!/usr/bin/env bash
# hf_rifle's benchmarks on a lent H200 GPU, as one prepared run of a few minutes:
#   1. the recipe's training images/s with ResNet-50 at 224 against a model-only loop on device-resident
#      tensors, bf16 and fp32: does the input pipeline keep the GPU busy (benchmarks/pipeline.py --parts gpu);
#   2. images/s of ResNet-50 fine-tuning at 224 (bf16, channels_last, batch 64), Trainer vs RifleTrainer
#      side by side, with L2-SP differentiated by autograd (the "before") as a fourth variant
#      (benchmarks/overhead.py);
#   3. the transfer benchmark at full resolution (benchmarks/transfer.py).
# Each step has its own timeout and a failing step does not stop the next; the exit status says whether all
# passed. JSON results go to benchmarks/results/ and, when $OUT is set (the device tool brings back what is
# written there), to $OUT together with gpu.log.
#
# Assumptions about the GPU machine (the workplace's notes on it, read 2026-11; nothing checked there yet):
# - No internet and no .venv; python3 (3.12) holds CUDA torch, timm, accelerate, huggingface_hub, psutil,
#   matplotlib and setuptools, but transformers 5.17, whose Trainer lacks `loss_is_scaled_for_ga`, which
#   RifleTrainer's L2-SP reads, and no datasets (which hf_rifle.recipe.data, and so likely transfer.py, imports).
#   So the wheels in build/wheels/ (gitignored) are installed first, into a private folder: CARRIED_PACKAGES,
#   pinned to this checkout's .venv (datasets' pyarrow and fsspec pins are not checked against the machine's).
#   Prepare them here (about 17 MB), then carry them:
#       bash benchmarks/gpu.sh fetch-wheels
#       device tool: run(command="bash benchmarks/gpu.sh", carry=["build/wheels"], timeout_s=600)
# - hf_rifle is installed from this working tree (offline, no build isolation), as users install it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# Seconds per step, within the device tool's 600 s per command (the install takes about a minute):
OVERHEAD_TIMEOUT=${OVERHEAD_TIMEOUT:-180}
PIPELINE_TIMEOUT=${PIPELINE_TIMEOUT:-150}  # 5,120 JPEGs written and cached once, 2 recipe runs, 2 model-only loops
# 20 runs of 280 steps at 224 px, cut short to fit the 600 s command (install ~60 s + 150 + 180 + 200); a rerun on
# a warm machine resumes the sweep where it stopped.
TRANSFER_TIMEOUT=${TRANSFER_TIMEOUT:-200}
RESULTS=benchmarks/results
OVERHEAD_JSON=$RESULTS/overhead-resnet50-cuda.json
PIPELINE_JSON=$RESULTS/pipeline-cuda.json
TRANSFER_JSON=$RESULTS/transfer-gpu.json
WHEELS=build/wheels
CARRIED_PACKAGES="transformers timm datasets dill multiprocess"
GPU_PYTHON_VERSION=3.12  # the machine's python3; some wheels (multiprocess) are made per Python version
FAILED=()

# Here, not on the GPU machine: download the wheels to carry, pinned to the versions of this checkout's .venv.
fetch_wheels() {
    local pins
    pins=$(.venv/bin/python -c 'import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))' $CARRIED_PACKAGES)
    rm -rf "$WHEELS"  # one version of each, or pip refuses the install
    # shellcheck disable=SC2086  # word splitting wanted: one requirement per word
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON_VERSION" \
        -d "$WHEELS" $pins
    ls -l "$WHEELS"
}

# The carried wheels and hf_rifle from the working tree, into a folder that PYTHONPATH puts first.
install_packages() {
    local site wheels
    site=$(mktemp -d)
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    shopt -u nullglob
    echo "== install into $site: ${wheels[*]:-(no carried wheels)} and hf_rifle"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site" "${wheels[@]}" .
    export PYTHONPATH=$site
    # From $site: run from the repo root, python would import the uninstalled ./hf_rifle instead.
    (cd "$site" && "$PYTHON" -) <<'EOF'
import timm, torch, transformers, hf_rifle
print(f"python3 torch {torch.__version__}, transformers {transformers.__version__}, timm {timm.__version__}, hf_rifle from {hf_rifle.__file__}")
assert torch.cuda.is_available(), "torch sees no CUDA device"
print("device:", torch.cuda.get_device_name())
EOF
}

# Run one benchmark step under its timeout; a failure is recorded and the next step still runs.
run_step() {
    local name=$1 seconds=$2 rc=0
    shift 2
    echo "== $name: $*"
    timeout "$seconds" "$@" || rc=$?
    if ((rc == 0)); then
        echo "== $name: ok"
    elif ((rc == 124)); then
        echo "== $name: FAILED, timed out after ${seconds}s"
        FAILED+=("$name")
    else
        echo "== $name: FAILED with exit status $rc"
        FAILED+=("$name")
    fi
}

copy_results_to_out() {
    [[ -n "${OUT:-}" ]] || return 0
    local file
    for file in "$OVERHEAD_JSON" "$PIPELINE_JSON" "$TRANSFER_JSON"; do
        if [[ -f $file ]]; then cp "$file" "$OUT/"; fi
    done
}

main() {
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
    rm -f "$OVERHEAD_JSON" "$PIPELINE_JSON" "$TRANSFER_JSON"  # so a failed step cannot pass off an older result as this run's
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv || true
    install_packages

    run_step "pipeline" "$PIPELINE_TIMEOUT" "$PYTHON" benchmarks/pipeline.py --parts gpu --images 4096 --epochs 2 \
        --batch_size 64 --output "$PIPELINE_JSON"

    run_step "overhead" "$OVERHEAD_TIMEOUT" "$PYTHON" benchmarks/overhead.py --model resnet50 --image-size 224 --batch-size 64 \
        --rounds 5 --steps-per-round 30 --warmup-steps 5 --micro-repeats 20 --l2sp-impl both \
        --device cuda --bf16 --channels-last --output "$OVERHEAD_JSON"

    run_step "transfer" "$TRANSFER_TIMEOUT" "$PYTHON" benchmarks/transfer.py --resolution 224 --output "$TRANSFER_JSON"

    copy_results_to_out
    if ((${#FAILED[@]})); then
        echo "== failed steps: ${FAILED[*]}"
        return 1
    fi
    echo "== all steps passed"
}

case "${1:-}" in
    fetch-wheels) fetch_wheels ;;
    "")
        mkdir -p "$RESULTS"
        main 2>&1 | tee "${OUT:-$RESULTS}/gpu.log"
        ;;
    *)
        echo "usage: bash benchmarks/gpu.sh [fetch-wheels]" >&2
        exit 2
        ;;
esac
