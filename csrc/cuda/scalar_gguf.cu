// SCALAR_GGUF on the GPU: activations staged as q8_1 (the same code as the CPU), then the
// token GEMV kernel with integer dot products per GGUF sub-block.
#include "common.cuh"
#include "kernels.h"
#include "token_gemv.cuh"

namespace jax_moe {
namespace {

__global__ void stage_q8_1_kernel(const float* x, int64_t nblocks, q8_1_staged* out) {
  for (int64_t b = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; b < nblocks;
       b += int64_t{gridDim.x} * blockDim.x) {
    const float* src = x + b * QK8_1;
    stage_q8_1([src](int i) { return src[i]; }, out[b]);
  }
}

}  // namespace

std::string launch_scalar_gguf(const MoeProblem& p, const MoeBuffers& b, uint8_t* scratch,
                               const ScratchLayout& s, cudaStream_t stream) {
  auto* xq = reinterpret_cast<q8_1_staged*>(scratch + s.staged);
  const int64_t nblocks = p.x_rows() * (p.K / QK8_1);
  if (nblocks > 0) {
    const int64_t grid = std::min<int64_t>((nblocks + 255) / 256, 65536);
    stage_q8_1_kernel<<<static_cast<unsigned>(grid), 256, 0, stream>>>(static_cast<const float*>(b.x), nblocks, xq);
    if (auto e = launch_error("stage_q8_1_kernel"); !e.empty()) return e;
  }
  std::string err;
  dispatch_format(p.wtype, [&](auto fmt) {
    err = launch_token_gemv<Q8_1Dot<decltype(fmt)>>(p, b, xq, false, stream);
  });
  return err;
}

}  // namespace jax_moe
