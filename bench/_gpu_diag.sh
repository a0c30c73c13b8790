set -u; export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 DSML_TEST_DEVICE=cuda
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
r() { n=$1; shift; timeout 200 "$@" > $OUT/$n.log 2>&1; echo "== $n rc=$?"; grep -E "tok/s|Error|error:|passed|failed" $OUT/$n.log | head -12; }
T="python3 -m pytest -q -p no:cacheprovider -o addopts="
K=tests/engine/kernels
r tests_new $T $K/test_cache_rows.py $K/test_decode_attention.py $K/test_indexer_scores.py $K/test_fp4_roundtrip.py $K/test_fp8_roundtrip.py $K/test_rmsnorm_rope.py $K/test_hc.py
E="python3 bench/engine.py --contexts 4096 --steps 5 --prefill 0 --batches= --quiet"
r L20 $E --layers 20 --out $OUT/L20.json
r L20_no_overlap $E --layers 20 --no-overlap --out $OUT/L20n.json
r L2 $E --layers 2 --out $OUT/L2.json
r tests_rest $T $K/test_fp8_linear.py $K/test_graph_capture.py tests/engine/test_decode.py tests/engine/test_runner.py
which compute-sanitizer; ls /usr/local/cuda*/bin 2>/dev/null | head -30
