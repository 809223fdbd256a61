// WMMA and WMMA_GGUF: a grouped GEMM on tensor cores (16x16x16 tiles, f32 accumulation).
//
// Two tile shapes (plan.h): 128x128 for many pairs per expert, and 32x256 ("skinny") when each
// expert sees few pairs and the work is streaming its weights. GGUF blocks are decoded (ggml's
// formulas, rounded once to x's dtype) by the loader into the registers that go to shared memory.
// This is the portable path (any tensor-core GPU); Hopper runs wgmma.cu / wgmma_gguf.cu.
//
// Pairs are grouped by expert (grouping.cu). Block (m, n) computes a BM x BN tile of one expert:
// BM pairs of that expert against BN weight rows, over K in steps of BK. Tiles go through a
// double-buffered shared-memory pipeline: each thread loads its 16-byte pieces of the next step
// into registers while the tensor cores work on the current one. The weight loader decides how a
// piece is made: copied from dense experts, in either layout, or decoded from GGUF blocks. The epilogue multiplies by the routing
// score and writes the output (or, when reducing, the per-pair f32 partial).
#include <mma.h>

#include "../common/gguf_formats.h"
#include "common.cuh"
#include "decode.cuh"
#include "grouped_gemm.cuh"
#include "kernels.h"

namespace jax_moe {
namespace {

using namespace nvcuda;

constexpr int BK = 32, PAD = 8, THREADS = 256, WARPS = THREADS / 32;
constexpr int LDT = BK + PAD;   // row stride of the x and w tiles (elements): 80 bytes
constexpr int CHUNKS = BK / 8;  // 16-byte pieces per tile row per step

// A tile shape: BM pairs x BN weight rows, warps arranged WARPS_M x WARPS_N.
template <int BM_, int BN_, int WARPS_M_>
struct Tile {
  static constexpr int BM = BM_, BN = BN_, WARPS_M = WARPS_M_, WARPS_N = WARPS / WARPS_M_;
  static constexpr int FM = BM / WARPS_M / 16, FN = BN / WARPS_N / 16;  // fragments per warp
  static constexpr int XP = (BM * CHUNKS + THREADS - 1) / THREADS;     // x pieces per thread
  static constexpr int WP = BN * CHUNKS / THREADS;                      // w pieces per thread
  static_assert(FM >= 1 && FN >= 1 && WP * THREADS == BN * CHUNKS, "tile shape");
};
using LargeTile = Tile<128, 128, 2>;
using SkinnyTile = Tile<32, 256, 1>;

// 8 consecutive K elements packed as a 16-byte vector of the activation dtype.
union Piece {
  uint4 v;
  uint16_t h[8];
};

// Weight loaders: piece (n, k0 .. k0+7) of expert e, zero outside [0, N) x [0, K).
struct DenseENK {
  template <DType D>
  static __device__ __forceinline__ Piece load(const GemmArgs& a, int64_t e, int64_t n, int64_t k0) {
    Piece p;
    const auto* row = static_cast<const uint16_t*>(a.w) + (e * a.N + n) * a.K;
    if (n < a.N && a.vec && k0 + 8 <= a.K) {
      p.v = __ldg(reinterpret_cast<const uint4*>(row + k0));
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) p.h[i] = (n < a.N && k0 + i < a.K) ? row[k0 + i] : 0;
    }
    return p;
  }
};

struct DenseEKN {
  template <DType D>
  static __device__ __forceinline__ Piece load(const GemmArgs& a, int64_t e, int64_t n, int64_t k0) {
    Piece p;
    const auto* w = static_cast<const uint16_t*>(a.w);
#pragma unroll
    for (int i = 0; i < 8; ++i) p.h[i] = (n < a.N && k0 + i < a.K) ? w[(e * a.K + k0 + i) * a.N + n] : 0;
    return p;
  }
};

// GGUF experts [E, N, row_bytes]: K is a multiple of the block size (32 or 256), so a piece of 8
// inside [0, K) lies in one sub-block.
template <class F>
struct GgufENK {
  template <DType D>
  static __device__ __forceinline__ Piece load(const GemmArgs& a, int64_t e, int64_t n, int64_t k0) {
    Piece p;
    if (n >= a.N || k0 >= a.K) {
      p.v = make_uint4(0, 0, 0, 0);
      return p;
    }
    const auto* blocks = reinterpret_cast<const typename F::Block*>(static_cast<const uint8_t*>(a.w) +
                                                                    (e * a.N + n) * a.row_bytes);
    const typename F::Block& blk = blocks[k0 / F::QK];
    const int i0 = static_cast<int>(k0 % F::QK);
    float sc, mn;
    F::scale_min(blk, i0 / F::SUB, sc, mn);
    p.v = decode8_rounded<F, D>(blk, i0, sc, mn);
    return p;
  }
};

template <DType D>
__device__ __forceinline__ Piece load_x(const GemmArgs& a, int64_t xrow, int64_t k0) {
  Piece p;
  const auto* row = static_cast<const uint16_t*>(a.x) + xrow * a.K;
  if (xrow >= 0 && a.vec && k0 + 8 <= a.K) {
    p.v = __ldg(reinterpret_cast<const uint4*>(row + k0));
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) p.h[i] = (xrow >= 0 && k0 + i < a.K) ? row[k0 + i] : 0;
  }
  return p;
}

template <DType D, class W, class C>
__global__ void __launch_bounds__(THREADS) grouped_wmma_kernel(GemmArgs a) {
  using T = typename DevType<D>::type;
  constexpr int BM = C::BM, BN = C::BN;
  __shared__ __align__(128) T xs[2][BM * LDT];
  __shared__ __align__(128) T ws[2][BN * LDT];
  __shared__ int64_t pair_of[BM];
  __shared__ int64_t xrow_of[BM];

  int64_t e, row0, rows;
  if (!find_tile<BM>(a, blockIdx.x, e, row0, rows)) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = (warp / C::WARPS_N) * (BM / C::WARPS_M), wn = (warp % C::WARPS_N) * (BN / C::WARPS_N);

  for (int r = threadIdx.x; r < BM; r += THREADS) {
    const int64_t pair = r < rows ? a.perm[row0 + r] : -1;
    pair_of[r] = pair;
    xrow_of[r] = pair < 0 ? -1 : (a.x_per_pair ? pair : pair / a.k);
  }
  __syncthreads();

  // Piece i of this thread: tile row (tid / CHUNKS + i * ROW_STEP), chunk tid % CHUNKS.
  const int prow = threadIdx.x / CHUNKS, pchunk = threadIdx.x % CHUNKS;
  constexpr int ROW_STEP = THREADS / CHUNKS;

  for (int64_t n0 = int64_t{blockIdx.y} * BN; n0 < a.N; n0 += int64_t{gridDim.y} * BN) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[C::FM][C::FN];
#pragma unroll
    for (int i = 0; i < C::FM; ++i)
#pragma unroll
      for (int j = 0; j < C::FN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    Piece px[C::XP], pw[C::WP];
    auto fetch = [&](int64_t k0) {
#pragma unroll
      for (int i = 0; i < C::XP; ++i) {
        const int r = prow + i * ROW_STEP;
        if (r < BM) px[i] = load_x<D>(a, xrow_of[r], k0 + pchunk * 8);
      }
#pragma unroll
      for (int i = 0; i < C::WP; ++i)
        pw[i] = W::template load<D>(a, e, n0 + prow + i * ROW_STEP, k0 + pchunk * 8);
    };
    auto stash = [&](int buf) {
#pragma unroll
      for (int i = 0; i < C::XP; ++i) {
        const int r = prow + i * ROW_STEP;
        if (r < BM) *reinterpret_cast<uint4*>(&xs[buf][r * LDT + pchunk * 8]) = px[i].v;
      }
#pragma unroll
      for (int i = 0; i < C::WP; ++i)
        *reinterpret_cast<uint4*>(&ws[buf][(prow + i * ROW_STEP) * LDT + pchunk * 8]) = pw[i].v;
    };

    __syncthreads();  // the previous tile's epilogue is done with the buffers
    fetch(0);
    stash(0);
    __syncthreads();
    int buf = 0;
    for (int64_t k0 = 0; k0 < a.K; k0 += BK) {
      const bool more = k0 + BK < a.K;
      if (more) fetch(k0 + BK);  // global loads in flight while the tensor cores work
#pragma unroll
      for (int kf = 0; kf < BK; kf += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[C::FM];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[C::FN];
#pragma unroll
        for (int i = 0; i < C::FM; ++i) wmma::load_matrix_sync(fa[i], &xs[buf][(wm + 16 * i) * LDT + kf], LDT);
#pragma unroll
        for (int j = 0; j < C::FN; ++j) wmma::load_matrix_sync(fb[j], &ws[buf][(wn + 16 * j) * LDT + kf], LDT);
#pragma unroll
        for (int i = 0; i < C::FM; ++i)
#pragma unroll
          for (int j = 0; j < C::FN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
      if (more) {
        stash(buf ^ 1);  // the other buffer: nobody reads it during this step
        __syncthreads();  // the new tile is visible, and everyone is done with `buf`
        buf ^= 1;
      }
    }

    // Epilogue, one 16x16 fragment at a time through a per-warp f32 staging area that aliases
    // the weight tiles (all warps finished their fragment loads at the barrier below).
    __syncthreads();
    float* stage = reinterpret_cast<float*>(&ws[0][0]) + warp * 256;
    static_assert(sizeof(ws) >= WARPS * 256 * sizeof(float), "staging fits the weight tiles");
#pragma unroll
    for (int i = 0; i < C::FM; ++i)
#pragma unroll
      for (int j = 0; j < C::FN; ++j) {
        wmma::store_matrix_sync(stage, acc[i][j], 16, wmma::mem_row_major);
        __syncwarp();
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          const int idx = lane + 32 * q, r = wm + 16 * i + idx / 16, c = wn + 16 * j + idx % 16;
          const int64_t pair = pair_of[r], n = n0 + c;
          if (pair < 0 || n >= a.N) continue;
          const float v = load_as_float(a.scores, pair, a.score_dtype) * stage[idx];
          if (a.partial != nullptr) a.partial[pair * a.N + n] = v;
          else store_from_float(a.out, pair * a.N + n, a.out_dtype, v);
        }
        __syncwarp();  // the staging area is read before the next fragment overwrites it
      }
  }
}

template <DType D, class C>
std::string launch_tile(const MoeProblem& p, const GemmArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(max_m_tiles(p, C::BM)), grid_y((p.N + C::BN - 1) / C::BN));
  std::string err;
  auto go = [&](auto loader) {
    grouped_wmma_kernel<D, decltype(loader), C><<<grid, THREADS, 0, stream>>>(a);
    err = launch_error("grouped_wmma_kernel");
  };
  if (p.kind == MoeKind::WMMA_GGUF) {
    if (!dispatch_format(p.wtype, [&](auto fmt) { go(GgufENK<decltype(fmt)>{}); }))
      return "internal: grouped_wmma_kernel has no GGUF format " + std::to_string(static_cast<int>(p.wtype));
  } else if (p.layout == WeightLayout::ENK) {
    go(DenseENK{});
  } else {
    go(DenseEKN{});
  }
  return err;
}

template <DType D>
std::string launch_for_dtype(const MoeProblem& p, const GemmArgs& a, GemmTile tile, cudaStream_t stream) {
  switch (tile) {
    case GemmTile::kWmma128x128: return launch_tile<D, LargeTile>(p, a, stream);
    case GemmTile::kWmmaSkinny32x256: return launch_tile<D, SkinnyTile>(p, a, stream);
    default: return "internal: grouped_wmma_kernel has no tile " + std::to_string(static_cast<int>(tile));
  }
}

}  // namespace

std::string launch_wmma(const MoeProblem& p, const GemmArgs& a, const CudaPlan& plan, cudaStream_t stream) {
  return p.x_dtype == DType::F16 ? launch_for_dtype<DType::F16>(p, a, plan.tile, stream)
                                 : launch_for_dtype<DType::BF16>(p, a, plan.tile, stream);
}

}  // namespace jax_moe
