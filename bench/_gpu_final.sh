set -u; export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 280 python3 bench/engine.py --layers 20 --contexts 4096,32768 --quiet --out $OUT/engine.json > $OUT/engine.log 2>&1; echo "engine rc=$?"
grep -v "^  layers\|Warning\|warn" $OUT/engine.log | tail -60
timeout 150 python3 -m bench.kernels.fp8_linear --rows 1 --no-baselines --all-configs --json $OUT/fp8.json > $OUT/fp8.log 2>&1; echo "fp8 rc=$?"
tail -100 $OUT/fp8.log
