// WMMA and WMMA_GGUF: a grouped GEMM on tensor cores (16x16x16 tiles, f32 accumulation).
//
// Two tile shapes: 128x128 for many pairs per expert, and 32x256 ("skinny") when each expert sees
// few pairs and the work is streaming its weights. GGUF experts are first decoded once into
// scratch (rounded to x's dtype) and the dense GEMM runs on them.
//
// Pairs are grouped by expert (grouping.cu). Block (m, n) computes a BM x BN tile of one expert:
// BM pairs of that expert against BN weight rows, over K in steps of BK. Tiles go through a
// double-buffered shared-memory pipeline: each thread loads its 16-byte pieces of the next step
// into registers while the tensor cores work on the current one. The weight loader decides how a
// piece is made: copied from dense experts, in either layout. The epilogue multiplies by the routing
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

// Pairs per expert below which the skinny tile is used.
constexpr int64_t kSkinnyPairsPerExpert = 64;

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

// Decode GGUF experts [E, N, K] into x's dtype (ggml's formulas, one rounding), 8 per thread.
template <class F, DType D>
__global__ void decode_experts_kernel(const uint8_t* w, int64_t rows, int64_t K, int64_t row_bytes, uint16_t* out) {
  const int64_t pieces = rows * (K / 8);
  for (int64_t p = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; p < pieces; p += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = p / (K / 8), k0 = (p % (K / 8)) * 8;
    const auto* blocks = reinterpret_cast<const typename F::Block*>(w + row * row_bytes);
    const typename F::Block& blk = blocks[k0 / F::QK];
    const int i0 = static_cast<int>(k0 % F::QK);
    float sc, mn;
    F::scale_min(blk, i0 / F::SUB, sc, mn);
    *reinterpret_cast<uint4*>(out + row * K + k0) = decode8_rounded<F, D>(blk, i0, sc, mn);
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
  if (p.layout == WeightLayout::ENK) go(DenseENK{}); else go(DenseEKN{});
  return err;
}

// Decode the GGUF experts once into scratch (x's dtype) and point the GEMM at them; the scratch
// region is 256-byte aligned, so the pieces stay 16-byte aligned (a.vec holds).
template <DType D>
std::string decode_experts(const MoeProblem& p, GemmArgs& a, uint8_t* scratch, const ScratchLayout& s,
                           cudaStream_t stream) {
  auto* out = reinterpret_cast<uint16_t*>(scratch + s.decoded);
  const int64_t pieces = p.E * p.N * (p.K / 8);
  std::string err;
  if (pieces > 0) {
    const unsigned grid = static_cast<unsigned>(std::min<int64_t>((pieces + 255) / 256, 1 << 20));
    dispatch_format(p.wtype, [&](auto fmt) {
      decode_experts_kernel<decltype(fmt), D><<<grid, 256, 0, stream>>>(
          static_cast<const uint8_t*>(a.w), p.E * p.N, p.K, p.row_bytes(), out);
      err = launch_error("decode_experts_kernel");
    });
  }
  a.w = out;
  return err;
}

bool skinny(const MoeProblem& p) { return p.pairs() < kSkinnyPairsPerExpert * std::max<int64_t>(p.E, 1); }

template <DType D>
std::string launch_for_dtype(const MoeProblem& p, GemmArgs a, bool hopper, uint8_t* scratch,
                             const ScratchLayout& s, cudaStream_t stream) {
  if (p.kind == MoeKind::WMMA_GGUF) {
    if (!gguf_decode_first(p.kind, p.T, p.k, p.E))  // the GEMV serves every other size
      return "internal: WMMA_GGUF reached the grouped GEMM below the decode-first size";
    if (auto err = decode_experts<D>(p, a, scratch, s, stream); !err.empty()) return err;
  }
  if (hopper) return launch_wgmma(p, a, stream);
  return skinny(p) ? launch_tile<D, SkinnyTile>(p, a, stream) : launch_tile<D, LargeTile>(p, a, stream);
}

}  // namespace

std::string launch_wmma(const MoeProblem& p, const MoeBuffers& b, uint8_t* scratch,
                        const ScratchLayout& s, bool hopper_device, cudaStream_t stream) {
  const bool vec = p.K % 8 == 0 && reinterpret_cast<uintptr_t>(b.x) % 16 == 0 &&
                   (p.kind != MoeKind::WMMA || reinterpret_cast<uintptr_t>(b.w) % 16 == 0);
  const bool hopper = hopper_device && vec && p.layout == WeightLayout::ENK;
  const int tile_m = hopper ? wgmma_tile_m(p) : skinny(p) ? SkinnyTile::BM : LargeTile::BM;
  if (auto e = group_pairs_by_expert(p, b.ids, scratch, s, tile_m, stream); !e.empty()) return e;
  if (p.pairs() == 0 || p.N == 0) return {};
  GemmArgs a{};
  a.x = b.x;
  a.w = b.w;
  a.scores = b.scores;
  a.out = p.reduce ? nullptr : b.out;
  a.partial = p.reduce ? reinterpret_cast<float*>(scratch + s.partial) : nullptr;
  a.offsets = reinterpret_cast<const int32_t*>(scratch + s.offsets);
  a.tile_start = reinterpret_cast<const int32_t*>(scratch + s.tile_start);
  a.perm = reinterpret_cast<const int32_t*>(scratch + s.perm);
  a.T = p.T; a.k = p.k; a.N = p.N; a.K = p.K; a.E = p.E;
  a.row_bytes = p.kind == MoeKind::WMMA_GGUF ? p.row_bytes() : 0;
  a.score_dtype = p.score_dtype;
  a.out_dtype = p.out_dtype;
  a.x_per_pair = p.x_per_pair;
  a.vec = vec;
  a.vec_out = p.N % 8 == 0 && (p.reduce || ((p.out_dtype == DType::BF16 || p.out_dtype == DType::F16) &&
                                              reinterpret_cast<uintptr_t>(b.out) % 16 == 0));
  return p.x_dtype == DType::F16 ? launch_for_dtype<DType::F16>(p, a, hopper, scratch, s, stream)
                                 : launch_for_dtype<DType::BF16>(p, a, hopper, scratch, s, stream);
}

}  // namespace jax_moe
