// The tensor-core GEMV (mma_gemv.cuh) for GGUF experts: Q2_K, Q4_K, Q5_K, Q8_0, Q6_K and MXFP4
// through their wide tiles (mma_gguf_wide.cu), every other format (Q3_K) through its Format<>
// traits (GgufTile).
#include "mma_gemv.cuh"

namespace jax_moe {

std::string launch_mma_gguf(const MoeProblem& p, const MoeBuffers& b, cudaStream_t stream) {
  if (has_wide_mma_tile(p.wtype)) return launch_mma_gguf_wide(p, b, stream);
  std::string err = std::string("launch_mma_gguf: unsupported format ") + type_name(p.wtype);
  auto run = [&](auto dtype) {
    constexpr DType D = decltype(dtype)::value;
    dispatch_format(p.wtype, [&](auto fmt) {
      using F = decltype(fmt);
      if constexpr (!has_wide_mma_tile(F::type)) err = launch_mma_gemv<GgufTile<F, D>, D>(p, b, stream);
    });
  };
  if (p.x_dtype == DType::F16) run(std::integral_constant<DType, DType::F16>{});
  else run(std::integral_constant<DType, DType::BF16>{});
  return err;
}

}  // namespace jax_moe
