// The tensor-core GEMV (mma_gemv.cuh) for every GGUF format's experts: whole-block
// wide loads (funnel-shifted where blocks sit at 2- or 4-byte boundaries), decoded in registers.
#include "mma_gemv.cuh"

namespace jax_moe {
namespace {

template <DType D>
std::string launch_for(const MoeProblem& p, const MoeBuffers& b, cudaStream_t stream) {
  switch (p.wtype) {
    case GGMLType::Q4_K: return launch_mma_gemv<KQuantTile<GGMLType::Q4_K, D>, D>(p, b, stream);
    case GGMLType::Q5_K: return launch_mma_gemv<KQuantTile<GGMLType::Q5_K, D>, D>(p, b, stream);
    case GGMLType::Q8_0: return launch_mma_gemv<Q80Tile<D>, D>(p, b, stream);
    case GGMLType::Q6_K: return launch_mma_gemv<Q6KTile<D>, D>(p, b, stream);
    case GGMLType::MXFP4: return launch_mma_gemv<Mxfp4Tile<D>, D>(p, b, stream);
    case GGMLType::Q2_K: return launch_mma_gemv<Q2KTile<D>, D>(p, b, stream);
    case GGMLType::Q3_K: return launch_mma_gemv<Q3KTile<D>, D>(p, b, stream);
    default: return std::string("launch_mma_gguf_wide: unsupported format ") + type_name(p.wtype);
  }
}

}  // namespace

std::string launch_mma_gguf_wide(const MoeProblem& p, const MoeBuffers& b, cudaStream_t stream) {
  return p.x_dtype == DType::F16 ? launch_for<DType::F16>(p, b, stream) : launch_for<DType::BF16>(p, b, stream);
}

}  // namespace jax_moe
