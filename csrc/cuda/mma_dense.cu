// The tensor-core GEMV (mma_gemv.cuh) for dense experts [E, N, K] in f16 / bf16.
#include "mma_gemv.cuh"

namespace jax_moe {

std::string launch_mma_dense(const MoeProblem& p, const MoeBuffers& b, cudaStream_t stream) {
  return p.x_dtype == DType::F16 ? launch_mma_gemv<DenseTile<DType::F16>, DType::F16>(p, b, stream)
                                 : launch_mma_gemv<DenseTile<DType::BF16>, DType::BF16>(p, b, stream);
}

}  // namespace jax_moe
