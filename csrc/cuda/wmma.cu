// WMMA and WMMA_GGUF: a grouped GEMM on tensor cores (16x16x16 tiles, f32 accumulation).
//
// Pairs are grouped by expert (grouping.cu). Block (m, n) computes a BM x BN tile of one expert:
// BM pairs of that expert against BN weight rows, over K in steps of BK. The weight tile goes
// through shared memory in the activation dtype: copied for dense experts (either layout),
// decoded with ggml's formulas and rounded once for GGUF experts. The epilogue multiplies by the
// routing score and writes the output (or, when reducing, the per-pair f32 partial).
#include <mma.h>

#include "../common/gguf_formats.h"
#include "common.cuh"
#include "kernels.h"

namespace jax_moe {
namespace {

using namespace nvcuda;

constexpr int BM = 64, BN = 64, BK = 32, PAD = 8, THREADS = 128;
constexpr int LDT = BK + PAD;  // row stride of the x and w tiles (elements)
constexpr int LDC = BN + 4;    // row stride of the f32 epilogue tile

struct GemmArgs {
  const void* x;
  const void* w;
  const void* scores;
  void* out;          // final output (no reduce) or nullptr
  float* partial;     // per-pair f32 results (reduce) or nullptr
  const int32_t* ids;
  const int32_t* offsets;
  const int32_t* tile_start;
  const int32_t* perm;
  int64_t T, k, N, K, E, row_bytes;
  DType score_dtype, out_dtype;
  bool x_per_pair;
};

// Weight loaders: element (n, kk) of expert e as f32, with n < N and kk < K guaranteed.
struct DenseENK {
  static constexpr bool kContiguousK = true;
  template <DType D>
  static __device__ __forceinline__ typename DevType<D>::type load(const GemmArgs& a, int64_t e, int64_t n, int64_t kk) {
    return static_cast<const typename DevType<D>::type*>(a.w)[(e * a.N + n) * a.K + kk];
  }
};

struct DenseEKN {
  static constexpr bool kContiguousK = false;
  template <DType D>
  static __device__ __forceinline__ typename DevType<D>::type load(const GemmArgs& a, int64_t e, int64_t n, int64_t kk) {
    return static_cast<const typename DevType<D>::type*>(a.w)[(e * a.K + kk) * a.N + n];
  }
};

template <class F>
struct Gguf {
  static constexpr bool kContiguousK = true;
  template <DType D>
  static __device__ __forceinline__ typename DevType<D>::type load(const GemmArgs& a, int64_t e, int64_t n, int64_t kk) {
    const auto* blocks = reinterpret_cast<const typename F::Block*>(
        static_cast<const uint8_t*>(a.w) + (e * a.N + n) * a.row_bytes);
    const typename F::Block& blk = blocks[kk / F::QK];
    const int i = static_cast<int>(kk % F::QK);
    float sc, mn;
    F::scale_min(blk, i / F::SUB, sc, mn);
    return DevType<D>::from_float(decode_value<F>(blk, i, sc, mn));
  }
};

// Which expert and which of its tiles block m works on; false when m is past the last tile.
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

template <DType D, class W>
__global__ void __launch_bounds__(THREADS) grouped_wmma_kernel(GemmArgs a) {
  using T = typename DevType<D>::type;
  __shared__ __align__(128) unsigned char smem_raw[BM * LDC * sizeof(float) > 2 * BM * LDT * sizeof(T)
                                                       ? BM * LDC * sizeof(float)
                                                       : 2 * BM * LDT * sizeof(T)];
  __shared__ int64_t pair_of[BM];
  __shared__ int64_t xrow_of[BM];
  T* xs = reinterpret_cast<T*>(smem_raw);
  T* ws = xs + BM * LDT;
  float* cs = reinterpret_cast<float*>(smem_raw);

  int64_t e, row0, rows;
  if (!find_tile(a, blockIdx.x, e, row0, rows)) return;
  const int warp = threadIdx.x >> 5;
  const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
  const T zero = DevType<D>::from_float(0.0f);

  if (threadIdx.x < BM) {
    const int r = threadIdx.x;
    const int64_t pair = r < rows ? a.perm[row0 + r] : -1;
    pair_of[r] = pair;
    xrow_of[r] = pair < 0 ? -1 : (a.x_per_pair ? pair : pair / a.k);
  }
  __syncthreads();

  for (int64_t n0 = int64_t{blockIdx.y} * BN; n0 < a.N; n0 += int64_t{gridDim.y} * BN) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    for (int64_t k0 = 0; k0 < a.K; k0 += BK) {
      __syncthreads();  // the previous step's fragments are loaded before the tiles are rewritten
      const T* xg = static_cast<const T*>(a.x);
      for (int idx = threadIdx.x; idx < BM * BK; idx += THREADS) {
        const int r = idx / BK, c = idx % BK;
        const int64_t kk = k0 + c, xr = xrow_of[r];
        xs[r * LDT + c] = (xr >= 0 && kk < a.K) ? xg[xr * a.K + kk] : zero;
      }
      for (int idx = threadIdx.x; idx < BN * BK; idx += THREADS) {
        // Consecutive threads walk the dimension that is contiguous in memory.
        const int r = W::kContiguousK ? idx / BK : idx % BN;
        const int c = W::kContiguousK ? idx % BK : idx / BN;
        const int64_t n = n0 + r, kk = k0 + c;
        ws[r * LDT + c] = (n < a.N && kk < a.K) ? W::template load<D>(a, e, n, kk) : zero;
      }
      __syncthreads();
      for (int kf = 0; kf < BK; kf += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], xs + (wm + 16 * i) * LDT + kf, LDT);
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], ws + (wn + 16 * j) * LDT + kf, LDT);
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    }
    __syncthreads();  // all warps are done with xs/ws before cs (which aliases them) is written
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(cs + (wm + 16 * i) * LDC + wn + 16 * j, acc[i][j], LDC, wmma::mem_row_major);
    __syncthreads();
    for (int idx = threadIdx.x; idx < BM * BN; idx += THREADS) {
      const int r = idx / BN, c = idx % BN;
      const int64_t pair = pair_of[r], n = n0 + c;
      if (pair < 0 || n >= a.N) continue;
      const float v = load_as_float(a.scores, pair, a.score_dtype) * cs[r * LDC + c];
      if (a.partial != nullptr) a.partial[pair * a.N + n] = v;
      else store_from_float(a.out, pair * a.N + n, a.out_dtype, v);
    }
  }
}

template <DType D>
std::string launch_for_dtype(const MoeProblem& p, const GemmArgs& a, cudaStream_t stream) {
  // Upper bound on M tiles: every non-empty expert adds at most one partial tile.
  const int64_t pairs = p.pairs();
  const int64_t m_tiles = (pairs + BM - 1) / BM + std::min<int64_t>(p.E, pairs);
  const dim3 grid(static_cast<unsigned>(m_tiles), grid_y((p.N + BN - 1) / BN));
  std::string err;
  auto go = [&](auto loader) {
    grouped_wmma_kernel<D, decltype(loader)><<<grid, THREADS, 0, stream>>>(a);
    err = launch_error("grouped_wmma_kernel");
  };
  if (p.kind == MoeKind::WMMA) {
    if (p.layout == WeightLayout::ENK) go(DenseENK{}); else go(DenseEKN{});
  } else {
    dispatch_format(p.wtype, [&](auto fmt) { go(Gguf<decltype(fmt)>{}); });
  }
  return err;
}

}  // namespace

std::string launch_wmma(const MoeProblem& p, const MoeBuffers& b, uint8_t* scratch,
                        const ScratchLayout& s, cudaStream_t stream) {
  if (auto e = group_pairs_by_expert(p, b.ids, scratch, s, BM, stream); !e.empty()) return e;
  if (p.pairs() == 0 || p.N == 0) return {};
  GemmArgs a{};
  a.x = b.x;
  a.w = b.w;
  a.scores = b.scores;
  a.out = p.reduce ? nullptr : b.out;
  a.partial = p.reduce ? reinterpret_cast<float*>(scratch + s.partial) : nullptr;
  a.ids = b.ids;
  a.offsets = reinterpret_cast<const int32_t*>(scratch + s.offsets);
  a.tile_start = reinterpret_cast<const int32_t*>(scratch + s.tile_start);
  a.perm = reinterpret_cast<const int32_t*>(scratch + s.perm);
  a.T = p.T; a.k = p.k; a.N = p.N; a.K = p.K; a.E = p.E;
  a.row_bytes = p.kind == MoeKind::WMMA_GGUF ? p.row_bytes() : 0;
  a.score_dtype = p.score_dtype;
  a.out_dtype = p.out_dtype;
  a.x_per_pair = p.x_per_pair;
  return p.x_dtype == DType::F16 ? launch_for_dtype<DType::F16>(p, a, stream)
                                 : launch_for_dtype<DType::BF16>(p, a, stream);
}

}  // namespace jax_moe
