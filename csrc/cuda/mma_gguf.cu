// The tensor-core GEMV (mma_gemv.cuh) for GGUF experts: every format's call enters here; Q2_K,
// Q3_K and Q8_0 are instantiated in this translation unit, Q4_K, Q5_K, Q6_K and MXFP4 in
// mma_gguf_wide.cu (two units that compile in parallel).
#include "mma_gemv.cuh"

namespace jax_moe {
namespace {

template <DType D>
std::string launch_for(const MoeProblem& p, const MoeBuffers& b, cudaStream_t stream) {
  switch (p.wtype) {
    case GGMLType::Q2_K: return launch_mma_gemv<Q2KTile<D>, D>(p, b, stream);
    case GGMLType::Q3_K: return launch_mma_gemv<Q3KTile<D>, D>(p, b, stream);
    case GGMLType::Q8_0: return launch_mma_gemv<Q80Tile<D>, D>(p, b, stream);
    default: return launch_mma_gguf_wide(p, b, stream);
  }
}

}  // namespace

std::string launch_mma_gguf(const MoeProblem& p, const MoeBuffers& b, cudaStream_t stream) {
  return p.x_dtype == DType::F16 ? launch_for<DType::F16>(p, b, stream) : launch_for<DType::BF16>(p, b, stream);
}

}  // namespace jax_moe
