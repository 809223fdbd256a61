// What the grouped GEMMs (wmma.cu, and wgmma.cu on Hopper) share: their arguments, the tile
// lookup and the epilogue store.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "../common/moe_problem.h"
#include "common.cuh"
#include "plan.h"

namespace jax_moe {

struct GemmArgs {
  const void* x;
  const void* w;
  const void* scores;
  void* out;          // final output (no reduce) or nullptr
  float* partial;     // per-pair f32 results (reduce) or nullptr
  const int32_t* offsets;
  const int32_t* tile_start;
  const int32_t* perm;
  int64_t T, k, N, K, E, row_bytes;
  DType score_dtype, out_dtype;
  bool x_per_pair;
  bool vec;  // x (and dense ENK w) allow 16-byte loads: aligned bases and K % 8 == 0
  bool vec_out;  // 16-byte stores of 8 columns: N % 8 == 0 and (partial, or out f16/bf16 and 16-byte aligned)
};

// Which expert and which of its tiles block m works on; false when m is past the last tile.
template <int BM>
__device__ bool find_tile(const GemmArgs& a, int64_t m, int64_t& e, int64_t& row0, int64_t& rows) {
  if (m >= a.tile_start[a.E]) return false;
  int64_t lo = 0, hi = a.E;  // tile_start[lo] <= m < tile_start[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (a.tile_start[mid] <= m) lo = mid; else hi = mid;
  }
  e = lo;
  row0 = a.offsets[e] + (m - a.tile_start[e]) * BM;
  rows = min(int64_t{BM}, a.offsets[e + 1] - row0);
  return true;
}

// The grouped GEMMs, each for the tiles the plan gives it (plan.h):
// wgmma.cu: Hopper, dense ENK experts.
std::string launch_wgmma(const MoeProblem& p, const GemmArgs& a, const CudaPlan& plan, cudaStream_t stream);
// wgmma_ws.cu: Hopper, dense ENK experts, the 128 x 256 tile warp-specialized (TMA weights).
std::string launch_wgmma_ws(const MoeProblem& p, const GemmArgs& a, cudaStream_t stream);
// wgmma_gguf.cu: Hopper, GGUF experts decoded into shared memory inside the GEMM.
std::string launch_wgmma_gguf(const MoeProblem& p, const GemmArgs& a, const CudaPlan& plan, cudaStream_t stream);
// wmma.cu: any tensor-core GPU, dense experts in either layout or GGUF decoded in registers.
std::string launch_wmma(const MoeProblem& p, const GemmArgs& a, const CudaPlan& plan, cudaStream_t stream);

// Epilogue of 8 adjacent columns n .. n+7 (n % 8 == 0) of one pair from f32 values v: scale by
// the routing score, then write the f32 partial (reduce) or the output (one rounding), with
// 16-byte stores where a.vec_out allows.
__device__ __forceinline__ void store_row8(const GemmArgs& a, int64_t pair, float score, int64_t n, const float* v) {
  if (pair < 0 || n >= a.N) return;
  float s[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) s[i] = v[i] * score;
  const int64_t i0 = pair * a.N + n;
  if (a.vec_out && n + 8 <= a.N) {
    if (a.partial != nullptr) {
      auto* d = reinterpret_cast<float4*>(a.partial + i0);
      d[0] = make_float4(s[0], s[1], s[2], s[3]);
      d[1] = make_float4(s[4], s[5], s[6], s[7]);
    } else {
      const bool bf = a.out_dtype == DType::BF16;
      uint32_t h[4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        h[i] = static_cast<uint32_t>(bf ? float_to_bf16(s[2 * i]) : float_to_half(s[2 * i])) |
               (static_cast<uint32_t>(bf ? float_to_bf16(s[2 * i + 1]) : float_to_half(s[2 * i + 1])) << 16);
      *reinterpret_cast<uint4*>(static_cast<uint16_t*>(a.out) + i0) = make_uint4(h[0], h[1], h[2], h[3]);
    }
    return;
  }
  for (int i = 0; i < 8 && n + i < a.N; ++i) {
    if (a.partial != nullptr) a.partial[i0 + i] = s[i];
    else store_from_float(a.out, i0 + i, a.out_dtype, s[i]);
  }
}

}  // namespace jax_moe
