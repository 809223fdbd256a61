// The small-T kernel shared by all three kinds: a block per (token or pair, tile of weight rows),
// one warp per row. With reduce, the warp loops over the token's k pairs in order, so the sum is
// deterministic in registers: no grouping, no scratch, one launch. Weights of an expert are
// re-read by each token routed to it, so this path is for few tokens per expert (decode-time T).
//
// A row-dot policy `Dot` supplies how one warp computes W[e][n] . xrow(pair) for its kind:
//   float Dot::partial(const Args&, int64_t e, int64_t n, int64_t pair, int lane)
// returns the lane's share; the warp sums the shares in a fixed order.
#pragma once

#include "../common/gguf_formats.h"
#include "../common/q8_1.h"
#include "common.cuh"
#include "decode.cuh"
#include "kernels.h"

namespace jax_moe {

constexpr int kGemvWarps = 8;

struct GemvArgs {
  const void* x;         // activations (or staged q8_1 blocks for SCALAR_GGUF)
  const int32_t* ids;
  const void* w;
  const void* scores;
  void* out;
  int64_t T, k, N, K, E, row_bytes;
  DType score_dtype, out_dtype;
  bool reduce, x_per_pair;
  bool vec;  // x and w allow 16-byte loads (16-byte aligned bases, K % 8 == 0): checked on the host
  __device__ __forceinline__ int64_t x_row(int64_t pair) const { return x_per_pair ? pair : pair / k; }
};

// blockIdx.x: token (reduce) or pair; blockIdx.y (looping): tile of kGemvWarps rows.
template <class Dot>
__global__ void __launch_bounds__(kGemvWarps * 32) token_gemv_kernel(GemvArgs a) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t unit = blockIdx.x;
  const int64_t j0 = a.reduce ? 0 : unit % a.k, j1 = a.reduce ? a.k : j0 + 1;
  const int64_t t = a.reduce ? unit : unit / a.k;
  for (int64_t n = int64_t{blockIdx.y} * kGemvWarps + warp; n < a.N; n += int64_t{gridDim.y} * kGemvWarps) {
    float acc = 0.0f;
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t pair = t * a.k + j;
      const int32_t e = a.ids[pair];
      if (!valid_expert(e, a.E)) continue;
      const float d = warp_sum(Dot::partial(a, e, n, pair, lane));
      acc += load_as_float(a.scores, pair, a.score_dtype) * d;
    }
    if (lane == 0) store_from_float(a.out, unit * a.N + n, a.out_dtype, acc);
  }
}

// SCALAR_GGUF: integer dot products of GGUF sub-blocks with q8_1-staged activations.
template <class F>
struct Q8_1Dot {
  static __device__ __forceinline__ float partial(const GemvArgs& a, int64_t e, int64_t n, int64_t pair, int lane) {
    constexpr int NSUB = F::QK / F::SUB;
    const auto* xq = static_cast<const q8_1_staged*>(a.x) + a.x_row(pair) * (a.K / QK8_1);
    const auto* blocks = reinterpret_cast<const typename F::Block*>(
        static_cast<const uint8_t*>(a.w) + (e * a.N + n) * a.row_bytes);
    float part = 0.0f;
    for (int64_t u = lane; u < a.K / F::SUB; u += 32) {
      const int64_t b = u / NSUB;
      part += dot_subblock_q8_1<F>(blocks[b], static_cast<int>(u % NSUB), xq + b * (F::QK / QK8_1));
    }
    return part;
  }
};

// 8 values of a 16-byte vector of f16/bf16 as f32.
template <DType D>
__device__ __forceinline__ void unpack8(const uint4& v, float* f) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = D == DType::BF16 ? bf16_to_float(static_cast<uint16_t>(w[i] & 0xffff))
                                : half_to_float(static_cast<uint16_t>(w[i] & 0xffff));
    f[2 * i + 1] = D == DType::BF16 ? bf16_to_float(static_cast<uint16_t>(w[i] >> 16))
                                    : half_to_float(static_cast<uint16_t>(w[i] >> 16));
  }
}

// WMMA (dense experts, [E, N, K]): 16-byte vector loads when K allows, products in f32.
template <DType D>
struct DenseDot {
  static __device__ __forceinline__ float partial(const GemvArgs& a, int64_t e, int64_t n, int64_t pair, int lane) {
    const auto* wr = static_cast<const uint16_t*>(a.w) + (e * a.N + n) * a.K;
    const auto* xr = static_cast<const uint16_t*>(a.x) + a.x_row(pair) * a.K;
    float part = 0.0f;
    if (a.vec) {
      const auto* w4 = reinterpret_cast<const uint4*>(wr);
      const auto* x4 = reinterpret_cast<const uint4*>(xr);
#pragma unroll 8
      for (int64_t c = lane; c < a.K / 8; c += 32) {
        float wf[8], xf[8];
        unpack8<D>(__ldg(w4 + c), wf);
        unpack8<D>(__ldg(x4 + c), xf);
#pragma unroll
        for (int i = 0; i < 8; ++i) part += wf[i] * xf[i];
      }
    } else {
      for (int64_t i = lane; i < a.K; i += 32)
        part += load_as_float(wr, i, D) * load_as_float(xr, i, D);
    }
    return part;
  }
};

// WMMA_GGUF: each lane decodes whole sub-blocks (ggml's formulas, f32), rounds each weight once
// to the activation dtype and multiplies in f32.
template <class F, DType D>
struct GgufDot {
  static __device__ __forceinline__ float partial(const GemvArgs& a, int64_t e, int64_t n, int64_t pair, int lane) {
    constexpr int NSUB = F::QK / F::SUB;
    const auto* blocks = reinterpret_cast<const typename F::Block*>(
        static_cast<const uint8_t*>(a.w) + (e * a.N + n) * a.row_bytes);
    const auto* xr = static_cast<const uint16_t*>(a.x) + a.x_row(pair) * a.K;
    float part = 0.0f;
#pragma unroll 2
    for (int64_t u = lane; u < a.K / F::SUB; u += 32) {
      const typename F::Block& blk = blocks[u / NSUB];
      const int s = static_cast<int>(u % NSUB);
      float sc, mn;
      F::scale_min(blk, s, sc, mn);
      const uint16_t* xs = xr + u * F::SUB;
#pragma unroll
      for (int c = 0; c < F::SUB / 8; ++c) {
        float xf[8];
        if (a.vec) {
          unpack8<D>(__ldg(reinterpret_cast<const uint4*>(xs) + c), xf);
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) xf[i] = load_as_float(xs, c * 8 + i, D);
        }
        float wf[8];
        unpack8<D>(decode8_rounded<F, D>(blk, s * F::SUB + c * 8, sc, mn), wf);
#pragma unroll
        for (int i = 0; i < 8; ++i) part += wf[i] * xf[i];
      }
    }
    return part;
  }
};

// Launch token_gemv_kernel<Dot> for problem p with activations x (or staged blocks).
template <class Dot>
std::string launch_token_gemv(const MoeProblem& p, const MoeBuffers& b, const void* x, bool vec,
                              cudaStream_t stream) {
  const int64_t units = p.reduce ? p.T : p.pairs();
  if (units == 0 || p.N == 0) return {};
  GemvArgs a{x, b.ids, b.w, b.scores, b.out, p.T, p.k, p.N, p.K, p.E,
             is_quantized(p.wtype) ? p.row_bytes() : 0, p.score_dtype, p.out_dtype,
             p.reduce, p.x_per_pair, vec};
  const dim3 grid(static_cast<unsigned>(units), grid_y((p.N + kGemvWarps - 1) / kGemvWarps));
  token_gemv_kernel<Dot><<<grid, kGemvWarps * 32, 0, stream>>>(a);
  return launch_error("token_gemv_kernel");
}

}  // namespace jax_moe
