// What the grouped GEMMs (wmma.cu, and wgmma.cu on Hopper) share: their arguments, the 16-byte
// piece of 8 activation-dtype values, the tile lookup and the epilogue store.
#pragma once

#include <cstdint>
#include <string>

#include "../common/moe_problem.h"
#include "common.cuh"

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
  bool pack_out;  // out is f16/bf16, 4-byte aligned, N even: two values per 32-bit store
};

// 8 consecutive K elements packed as a 16-byte vector of the activation dtype.
union Piece {
  uint4 v;
  uint16_t h[8];
};

template <DType D>
__device__ __forceinline__ uint16_t to_bits(float f) {
  return D == DType::BF16 ? float_to_bf16(f) : float_to_half(f);
}

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

// wgmma.cu: the Hopper grouped GEMM for dense ENK experts (or GGUF experts decoded first).
// Usable when the build has sm_90a, the device is compute capability 9.0 and pieces are 16-byte
// aligned (vec); its M tile decides how pairs are grouped.
bool wgmma_usable(const MoeProblem& p, bool vec);
int wgmma_tile_m(const MoeProblem& p);
std::string launch_wgmma(const MoeProblem& p, const GemmArgs& a, cudaStream_t stream);

// Epilogue of two adjacent columns n, n + 1 (n even) of one pair: scale by the routing score, then write
// the f32 partial (reduce) or the output (one rounding).
__device__ __forceinline__ void store_two(const GemmArgs& a, int64_t pair, float score, int64_t n,
                                          float v0, float v1) {
  if (pair < 0 || n >= a.N) return;
  v0 *= score;
  v1 *= score;
  const int64_t i = pair * a.N + n;
  const bool both = n + 1 < a.N;
  if (a.partial != nullptr) {
    if (both && a.N % 2 == 0) {
      *reinterpret_cast<float2*>(a.partial + i) = make_float2(v0, v1);
    } else {
      a.partial[i] = v0;
      if (both) a.partial[i + 1] = v1;
    }
  } else if (a.pack_out && both) {
    const bool bf = a.out_dtype == DType::BF16;
    const uint32_t lo = bf ? float_to_bf16(v0) : float_to_half(v0);
    const uint32_t hi = bf ? float_to_bf16(v1) : float_to_half(v1);
    reinterpret_cast<uint32_t*>(a.out)[i / 2] = lo | (hi << 16);
  } else {
    store_from_float(a.out, i, a.out_dtype, v0);
    if (both) store_from_float(a.out, i + 1, a.out_dtype, v1);
  }
}

}  // namespace jax_moe
