// WMMA and WMMA_GGUF at small T through the token GEMV (token_gemv.cuh), where the plan says so
// (GGUF experts that fit it take the tensor-core GEMV of mma_gemv.cuh instead). Same numerical
// contract as the tensor-core GEMM (weights as stored or decoded and rounded once to x's dtype,
// f32 accumulation).
#include <cstdint>

#include "common.cuh"
#include "kernels.h"
#include "token_gemv.cuh"

namespace jax_moe {

std::string launch_small_t(const MoeProblem& p, const MoeBuffers& b, cudaStream_t stream) {
  const bool vec = p.K % 8 == 0 && reinterpret_cast<uintptr_t>(b.x) % 16 == 0 &&
                   (p.kind == MoeKind::WMMA_GGUF || reinterpret_cast<uintptr_t>(b.w) % 16 == 0);
  std::string err;
  auto run = [&](auto dtype) {
    constexpr DType D = decltype(dtype)::value;
    if (p.kind == MoeKind::WMMA) {
      err = launch_token_gemv<DenseDot<D>>(p, b, b.x, vec, stream);
    } else {
      dispatch_format(p.wtype, [&](auto fmt) {
        err = launch_token_gemv<GgufDot<decltype(fmt), D>>(p, b, b.x, vec, stream);
      });
    }
  };
  if (p.x_dtype == DType::F16) run(std::integral_constant<DType, DType::F16>{});
  else run(std::integral_constant<DType, DType::BF16>{});
  return err;
}

}  // namespace jax_moe
