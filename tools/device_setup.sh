# Sourced by tools/dev_check.sh and tools/h200_check.sh on the lent H200: the carried gguf wheel
# on PYTHONPATH, then the editable build for sm_90a, redone where the module is missing or the
# carried kernel archive (.dev/libjax_moe_cuda_kernels.a, built here for 90a) differs from the one
# it was last built with (a warm machine keeps the last call's build, which would otherwise run the
# previous kernels). Needs OUT; prints "build: N s"; returns 1 (with the build log's tail) on failure.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
device_build() {
  local t0 stamp=build/h200/.prebuilt-stamp pre=""
  t0=$(date +%s)
  if ! python3 -c "import jax_moe._jax_moe_cuda" 2>/dev/null || { [ -f .dev/libjax_moe_cuda_kernels.a ] && \
       ! cmp -s .dev/libjax_moe_cuda_kernels.a "$stamp"; }; then
    [ -f .dev/libjax_moe_cuda_kernels.a ] && pre="-Ccmake.define.JAX_MOE_PREBUILT_CUDA_KERNELS=$PWD/.dev/libjax_moe_cuda_kernels.a"
    python3 -m pip install --no-build-isolation --no-deps -e . -Cbuild-dir=build/h200 $pre \
      -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90a -Ccmake.define.JAX_MOE_CUDA=ON > "$OUT/build.log" 2>&1 \
      || { tail -40 "$OUT/build.log"; return 1; }
    if [ -f .dev/libjax_moe_cuda_kernels.a ]; then cp .dev/libjax_moe_cuda_kernels.a "$stamp"; else rm -f "$stamp"; fi
  fi
  echo "build: $(( $(date +%s) - t0 )) s"
}
