// SCALAR_GGUF on the GPU: activations staged as q8_1 (the same code as the CPU), then one warp
// per (token or pair, weight row) takes integer dot products over the row's sub-blocks. With
// reduce, the warp loops over the token's k pairs in order, so the sum is deterministic.
#include "../common/gguf_formats.h"
#include "../common/q8_1.h"
#include "common.cuh"
#include "kernels.h"

namespace jax_moe {
namespace {

__global__ void stage_q8_1_kernel(const float* x, int64_t nblocks, block_q8_1* out) {
  for (int64_t b = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; b < nblocks;
       b += int64_t{gridDim.x} * blockDim.x) {
    const float* src = x + b * QK8_1;
    stage_q8_1([src](int i) { return src[i]; }, out[b]);
  }
}

constexpr int kWarps = 8;

struct ScalarArgs {
  const block_q8_1* xq;
  const int32_t* ids;
  const uint8_t* w;
  const void* scores;
  float* out;
  int64_t T, k, N, K, E, row_bytes;
  DType score_dtype;
  bool reduce, x_per_pair;
};

// blockIdx.x: token (reduce) or pair; each warp one weight row n, looping over y.
template <class F>
__global__ void __launch_bounds__(kWarps * 32) scalar_gguf_kernel(ScalarArgs a) {
  constexpr int NSUB = F::QK / F::SUB;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t unit = blockIdx.x;
  const int64_t j0 = a.reduce ? 0 : unit % a.k, j1 = a.reduce ? a.k : j0 + 1;
  const int64_t t = a.reduce ? unit : unit / a.k;
  const int64_t units = a.K / F::SUB;
  for (int64_t n = int64_t{blockIdx.y} * kWarps + warp; n < a.N; n += int64_t{gridDim.y} * kWarps) {
    float acc = 0.0f;
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t pair = t * a.k + j;
      const int32_t e = a.ids[pair];
      if (!valid_expert(e, a.E)) continue;
      const block_q8_1* xq = a.xq + (a.x_per_pair ? pair : t) * (a.K / QK8_1);
      const auto* blocks = reinterpret_cast<const typename F::Block*>(a.w + (e * a.N + n) * a.row_bytes);
      float part = 0.0f;
      for (int64_t u = lane; u < units; u += 32) {
        const int64_t b = u / NSUB;
        part += dot_subblock_q8_1<F>(blocks[b], static_cast<int>(u % NSUB), xq + b * (F::QK / QK8_1));
      }
      const float d = warp_sum(part);
      acc += load_as_float(a.scores, pair, a.score_dtype) * d;
    }
    if (lane == 0) a.out[unit * a.N + n] = acc;
  }
}

}  // namespace

std::string launch_scalar_gguf(const MoeProblem& p, const MoeBuffers& b, uint8_t* scratch,
                               const ScratchLayout& s, cudaStream_t stream) {
  auto* xq = reinterpret_cast<block_q8_1*>(scratch + s.staged);
  const int64_t nblocks = p.x_rows() * (p.K / QK8_1);
  if (nblocks > 0) {
    const int64_t grid = std::min<int64_t>((nblocks + 255) / 256, 65536);
    stage_q8_1_kernel<<<static_cast<unsigned>(grid), 256, 0, stream>>>(static_cast<const float*>(b.x), nblocks, xq);
    if (auto e = launch_error("stage_q8_1_kernel"); !e.empty()) return e;
  }
  const int64_t units = p.reduce ? p.T : p.pairs();
  if (units == 0 || p.N == 0) return {};
  ScalarArgs a{xq, b.ids, static_cast<const uint8_t*>(b.w), b.scores, static_cast<float*>(b.out),
               p.T, p.k, p.N, p.K, p.E, p.row_bytes(), p.score_dtype, p.reduce, p.x_per_pair};
  const dim3 grid(static_cast<unsigned>(units), grid_y((p.N + kWarps - 1) / kWarps));
  std::string err;
  dispatch_format(p.wtype, [&](auto fmt) {
    using F = decltype(fmt);
    scalar_gguf_kernel<F><<<grid, kWarps * 32, 0, stream>>>(a);
    err = launch_error("scalar_gguf_kernel");
  });
  return err;
}

}  // namespace jax_moe
