// WMMA and WMMA_GGUF at small T. Where it fits (mma_gemv_fits: sm_80+, K a multiple of 256,
// up to 512 pairs) the tensor-core GEMV of mma_gemv.cuh, which reads and decodes each routed
// expert's rows once for up to 16 of its pairs; else the token GEMV (token_gemv.cuh). Same
// numerical contract as the tensor-core GEMM (weights as stored or decoded and rounded once to
// x's dtype, f32 accumulation).
#include <cstdint>
#include <cstdlib>

#include "common.cuh"
#include "kernels.h"
#include "mma_gemv.cuh"
#include "token_gemv.cuh"

namespace jax_moe {
namespace {

// Experiment switch (benchmarks/NOTES.md, v15): JAX_MOE_GEMV_SPLIT=1 rounds Q4_K's, Q5_K's
// and Q8_0's decoded values to bf16 with Veltkamp's split on the FMA pipe instead of cvt.
bool split_rounding() {
  static const bool on = [] {
    const char* v = std::getenv("JAX_MOE_GEMV_SPLIT");
    return v && v[0] == '1';
  }();
  return on;
}

template <DType D>
std::string launch_mma(const MoeProblem& p, const MoeBuffers& b, cudaStream_t stream) {
  if (p.kind == MoeKind::WMMA) return launch_mma_gemv<DenseTile<D>, D>(p, b, stream);
  std::string err;
  dispatch_format(p.wtype, [&](auto fmt) {
    using F = decltype(fmt);
    if constexpr (F::type == GGMLType::Q4_K || F::type == GGMLType::Q5_K) {
      err = split_rounding() ? launch_mma_gemv<KQuantTile<F::type, D, true>, D>(p, b, stream)
                             : launch_mma_gemv<KQuantTile<F::type, D, false>, D>(p, b, stream);
    } else if constexpr (F::type == GGMLType::Q8_0) {
      err = split_rounding() ? launch_mma_gemv<Q80Tile<D, true>, D>(p, b, stream)
                             : launch_mma_gemv<Q80Tile<D, false>, D>(p, b, stream);
    } else {
      err = launch_mma_gemv<GgufTile<F, D>, D>(p, b, stream);
    }
  });
  return err;
}

}  // namespace

std::string launch_small_t(const MoeProblem& p, const MoeBuffers& b, cudaStream_t stream) {
  const bool aligned = reinterpret_cast<uintptr_t>(b.x) % 16 == 0 && reinterpret_cast<uintptr_t>(b.w) % 16 == 0;
  if (mma_gemv_fits(p, current_device().cc_major, aligned)) {
    return p.x_dtype == DType::F16 ? launch_mma<DType::F16>(p, b, stream) : launch_mma<DType::BF16>(p, b, stream);
  }
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
