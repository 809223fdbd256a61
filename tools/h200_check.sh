#!/usr/bin/env bash
# On the lent H200 (device tool): build for sm_90a, run the GPU suite and the CPU suite, then the
# GPU suite (or a subset) under compute-sanitizer. Logs go to $OUT; a short summary prints last.
#   bash tools/h200_check.sh [tests|sanitize|all] [pytest -k expression for the sanitizer runs]
#   bash tools/h200_check.sh bench "[bench_moe.py arguments]"
#   ONLY=qwen3/gate_up/1/,mixtral/gate_up/1/ bash tools/h200_check.sh decode-ncu   (ncu of the decode rows,
#     one process per part: tools/profile_decode.py; TS=64,4096 for bench_moe.py's rows at other T)
#   bash tools/h200_check.sh small "[bench_moe.py arguments]"   (the decode-time kernels: their GPU
#     tests, ncu of the GEMV kernels with both Q4_K roundings, then the benchmark rows)
set -u
MODE=${1:-all}
SAN_K="enk or Q4_K or Q3_K or scalar or edge or reproducible or many_k or gguf_many_blocks"
[ "$MODE" != bench ] && [ -n "${2:-}" ] && SAN_K=$2
OUT=${OUT:-/tmp/jax_moe_out}
mkdir -p "$OUT"
source tools/device_setup.sh
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"
device_build || exit 1
python3 -c "import jax, jax_moe; print('jax', jax.__version__, jax.devices()); print(jax_moe.build_info())"
summary=()
cd tests
if [ "$MODE" = tests ] || [ "$MODE" = all ]; then
  python3 -m pytest -q -m gpu test_gpu.py -x -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
  summary+=("gpu tests: $(tail -1 "$OUT/gpu_tests.log")")
  python3 -m pytest -q test_codecs.py test_moe_matmul.py -p no:cacheprovider 2>&1 | tee "$OUT/cpu_tests.log" | tail -3
  summary+=("cpu tests (jax on the device): $(tail -1 "$OUT/cpu_tests.log")")
  if [ -f test_gpu_properties.py ]; then
    python3 -m pytest -q -m gpu test_gpu_properties.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_props.log" | tail -15
    summary+=("gpu properties and long runs: $(tail -1 "$OUT/gpu_props.log")")
  fi
fi
if [ "$MODE" = sanitize ] || [ "$MODE" = all ]; then
  for tool in memcheck racecheck synccheck; do
    compute-sanitizer --tool "$tool" --print-limit 20 python3 -m pytest -q -m gpu test_gpu.py -p no:cacheprovider \
      -k "($SAN_K) and not graphs and not million" > "$OUT/$tool.log" 2>&1
    summary+=("$tool: $(grep -E '(passed|failed)' "$OUT/$tool.log" | tail -1) | $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$tool.log" | sort | uniq -c | tr '\n' ' ')")
  done
fi
if [ "$MODE" = profile ]; then
  cd ..
  ncu --clock-control none --print-summary per-kernel --kernel-name regex:"token_gemv|grouped_wmma|grouped_wgmma|decode_experts|stage|histogram|scan|scatter|reduce|zero" \
    python3 tools/profile_small.py > "$OUT/ncu.log" 2>&1
  grep -E "token_gemv|grouped_w|decode_experts|Duration|done" "$OUT/ncu.log" | head -80
  exit 0
fi
if [ "$MODE" = small ]; then
  t0=$(date +%s)
  timeout ${TESTS_S:-80} python3 -m pytest -q -m gpu test_gpu_small_t.py test_gpu.py test_gpu_properties.py -p no:cacheprovider \
    -k "small_t or mma or wmma_gguf_gpu or agrees or reproducible or edge or graphs or any_input or nan_in_x or out_of_range or empty_experts" > "$OUT/gpu_tests.log" 2>&1
  summary+=("gpu tests ($(( $(date +%s) - t0 )) s): $(tail -1 "$OUT/gpu_tests.log")")
  python3 -m pytest -q test_plan.py -p no:cacheprovider > "$OUT/plan_tests.log" 2>&1
  summary+=("plan tests: $(tail -1 "$OUT/plan_tests.log")")
  grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" "$OUT/plan_tests.log" | head -12
  cd ..
  timeout ${NCU_S:-60} ncu --clock-control none --print-summary per-kernel --kernel-name regex:"mma_gemv|token_gemv" \
    python3 tools/profile_small.py ${FMTS:-bf16,Q4_K,Q6_K} > "$OUT/ncu.log" 2>&1
  t1=$(date +%s)
  [ -n "${2:-}" ] && timeout ${BENCH_S:-170} python3 benchmarks/bench_moe.py ${2} --out "$OUT/bench.json" 2>&1 | grep -v "^WARNING" > "$OUT/bench.log"
  summary+=("bench ($(( $(date +%s) - t1 )) s)")
  echo "===== ncu"; grep -E "mma_gemv_kernel<|token_gemv_kernel<|Duration|DRAM Throughput|Compute \(SM\)|Registers Per|Achieved Occ" "$OUT/ncu.log" \
    | sed -E 's/^ +//; s/ +/ /g; s/\(MmaGemvArgs\)//' | cut -c1-100 | head -70
  echo "===== bench"; cat "$OUT/bench.log" 2>/dev/null | tail -40
  echo "===== summary"; printf '%s\n' "${summary[@]}"
  exit 0
fi
if [ "$MODE" = decode-ncu ]; then
  # Where every decode row's kernel time goes (tools/profile_decode.py): ONLY=<substrings> limits the
  # rows, one ncu process per comma-separated part (python under ncu has died with a segfault after
  # ~15 rows of both shapes in one process; one shape per process ran clean), the tables joined.
  cd ..
  i=0
  for part in $(echo "${ONLY:-qwen3/gate_up/,mixtral/gate_up/,qwen3/down/,mixtral/down/}" | tr ',' ' '); do
    i=$((i + 1)); d="$OUT/ncu_$(printf %02d $i)"; mkdir -p "$d"
    timeout ${NCU_S:-400} ncu --clock-control none --csv --page details --log-file "$d/decode_ncu.csv" \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --metrics "$(python3 tools/profile_decode.py metrics)" --kernel-name regex:"token_gemv|mma_gemv|grouped_w" \
      python3 tools/profile_decode.py run "$d/decode_rows.json" --only "$part" ${TS:+--ts "$TS"} > "$d/decode_run.log" 2>&1
    python3 tools/profile_decode.py table "$d/decode_ncu.csv" "$d/decode_rows.json" > "$d/decode_ncu.md" \
      || echo "decode-ncu: no table for $part (see $d/decode_run.log)"
  done
  # One header, then every part's rows.
  cat "$OUT"/ncu_*/decode_ncu.md 2>/dev/null | awk 'NR <= 2 || !/^\| row \||^\|---/' | tee "$OUT/decode_ncu.md"
  exit 0
fi
if [ "$MODE" = bench ]; then
  cd ..
  python3 benchmarks/bench_moe.py ${2:-} --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | grep -v "^WARNING"
  exit 0
fi
echo "===== summary"
printf '%s\n' "${summary[@]}"
