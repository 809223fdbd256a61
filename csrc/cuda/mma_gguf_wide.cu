// The tensor-core GEMV (mma_gemv.cuh) for Q4_K, Q5_K, Q6_K and MXFP4 experts, whole-block loads
// (funnel-shifted where blocks sit at 2-byte boundaries) decoded in registers; entered through
// launch_mma_gguf (mma_gguf.cu), which instantiates the other formats.
#include "mma_gemv.cuh"

namespace jax_moe {
namespace {

template <DType D>
std::string launch_for(const MoeProblem& p, const MoeBuffers& b, cudaStream_t stream) {
  switch (p.wtype) {
    case GGMLType::Q4_K: return launch_mma_gemv<KQuantTile<GGMLType::Q4_K, D>, D>(p, b, stream);
    case GGMLType::Q5_K: return launch_mma_gemv<KQuantTile<GGMLType::Q5_K, D>, D>(p, b, stream);
    case GGMLType::Q6_K: return launch_mma_gemv<Q6KTile<D>, D>(p, b, stream);
    case GGMLType::MXFP4: return launch_mma_gemv<Mxfp4Tile<D>, D>(p, b, stream);
    default: return std::string("launch_mma_gguf_wide: unsupported format ") + type_name(p.wtype);
  }
}

}  // namespace

std::string launch_mma_gguf_wide(const MoeProblem& p, const MoeBuffers& b, cudaStream_t stream) {
  return p.x_dtype == DType::F16 ? launch_for<DType::F16>(p, b, stream) : launch_for<DType::BF16>(p, b, stream);
}

}  // namespace jax_moe
