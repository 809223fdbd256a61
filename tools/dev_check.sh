#!/usr/bin/env bash
# One device call during development (the lent H200): build for sm_90a, run a pytest -k subset of
# the GPU suite (every -m gpu file and test_plan.py), optionally one compute-sanitizer tool over a smaller subset, then benchmark rows.
#   bash tools/dev_check.sh "<pytest -k for test_gpu.py>" "<sanitizer tool or ''>" "<sanitizer -k>" "<bench --only>" [bench args]
# To spend no device time compiling, build the kernels here for 90a and carry them (device tool
# carry [".dev"]); only the nanobind modules are then built on the device (12-20 s):
#   cmake -S . -B /tmp/cubuild -G Ninja -DCMAKE_CUDA_ARCHITECTURES=90a -DJAX_MOE_CUDA=ON && cmake --build /tmp/cubuild -j2
#   mkdir -p .dev && cp /tmp/cubuild/libjax_moe_cuda_kernels.a .dev/
set -u
OUT=${OUT:-/tmp/jax_moe_out}; mkdir -p "$OUT"
source tools/device_setup.sh
device_build || exit 1
t0=$(date +%s)
summary=()
if [ -n "${1:-}" ]; then
  (cd tests && python3 -m pytest -q -m gpu test_gpu.py test_gpu_small_t.py test_gpt_oss.py test_gpu_properties.py \
     test_plan.py -p no:cacheprovider -k "$1" 2>&1) > "$OUT/tests.log"
  grep -E "^(FAILED|ERROR)|Error|assert" "$OUT/tests.log" | head -20
  summary+=("tests: $(tail -1 "$OUT/tests.log") ($(( $(date +%s) - t0 )) s)")
fi
if [ -n "${2:-}" ]; then
  (cd tests && compute-sanitizer --tool "$2" --print-limit 10 python3 -m pytest -q -m gpu test_gpu.py test_gpu_small_t.py \
     -p no:cacheprovider -k "$3" 2>&1) > "$OUT/$2.log"
  summary+=("$2: $(grep -E '(passed|failed)' "$OUT/$2.log" | tail -1) | $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$2.log" | sort | uniq -c | tr '\n' ' ') ($(( $(date +%s) - t0 )) s)")
fi
if [ -n "${4:-}" ]; then
  only=$4; shift 4
  python3 benchmarks/bench_moe.py --only "$only" "$@" --out "$OUT/bench.json" > "$OUT/bench.log" 2>&1
  grep -vE "^WARNING|^\s*$" "$OUT/bench.log" | tail -40
fi
echo "===== summary"
printf '%s\n' "${summary[@]}"
