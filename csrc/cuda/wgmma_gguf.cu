// WMMA_GGUF on Hopper: the grouped GEMM on wgmma (sm_90a) with the GGUF blocks decoded inside it.
//
// The GEMM reads only the quantized bytes. Per block (256 threads, two warpgroups): a BM x 128 tile
// of one expert (BM = 64 or 128 pairs; the first BM / 64 warpgroups run wgmma, every thread copies
// and decodes), K in steps of 64. Shared memory holds
//   - a ring of A_STAGES x tiles (gathered rows, 128-byte swizzle), cp.async AHEAD steps ahead;
//   - a ring of 2 raw stages: each holds, for the tile's 128 weight rows, the GGUF bytes of 256 K
//     elements (one super-block, or 8 blocks of 32) as stored, copied with cp.async in 16-byte
//     pieces from the 16-byte boundary below the row's bytes, so that every format's block
//     alignment holds in shared memory as in global memory;
//   - three B tiles (128 rows x 64 of x's dtype, swizzled): while the tensor cores work on step j,
//     the threads decode step j + 1's 64 K elements of every row from the raw stage into
//     B[(j + 1) % 3] (ggml's formulas, one rounding).
// Each weight row belongs to two adjacent lanes of one warp, which copy its raw bytes and decode
// it: they wait for their own copies and meet at __syncwarp, so one block-wide barrier per step
// (making the decoded tile and the x pieces visible to the tensor cores) is all the step needs.
// Numerics are the contract's (DESIGN.md §4): weights decoded exactly and rounded once to x's
// dtype, products and accumulation in f32, one rounding at the end (wgmma_common.cuh's epilogue).
#include "../common/gguf_formats.h"
#include "common.cuh"
#include "decode.cuh"
#include "grouped_gemm.cuh"
#include "kernels.h"
#include "wgmma_common.cuh"
#include "wgmma_ops.cuh"

namespace jax_moe {
namespace {

using hop::BK;
using hop::kRowBytes;
using hop::swizzled;

constexpr int kSuper = 256;                  // K elements of one raw stage
constexpr int kStepsPerSuper = kSuper / BK;  // K steps per raw stage

constexpr int gcd16(int n) { return n % 16 == 0 ? 16 : n % 8 == 0 ? 8 : n % 4 == 0 ? 4 : n % 2 == 0 ? 2 : 1; }

template <class F, int MMA_WG_>
struct GgufTile {
  using Block = typename F::Block;
  static constexpr int MMA_WG = MMA_WG_, BM = 64 * MMA_WG_, BN = 128, THREADS = 256;
  static constexpr int AHEAD = 3;             // K steps whose copies are in flight
  static constexpr int A_STAGES = AHEAD + 2;  // the slot step j + AHEAD fills was last read by wgmma j - 2
  static constexpr int B_TILES = 3;           // the tile step j + 1 fills was last read by wgmma j - 2
  static constexpr int RAW_STAGES = 2;        // the stage super-step s + 2 fills was last read at step 4s + 3
  static constexpr int BB = sizeof(Block);
  static constexpr int CHUNK = kSuper / F::QK * BB;  // bytes of one row per raw stage
  // A row's chunk starts at a multiple of gcd(BB, 16) (rows are whole blocks, the buffer is
  // 16-byte aligned): the copy starts at the 16-byte boundary below it.
  static constexpr int MAX_OFF = 16 - gcd16(BB);
  static constexpr int RAW_ROW = (CHUNK + MAX_OFF + 15) / 16 * 16;
  static constexpr int RAW_PIECES = RAW_ROW / 16;  // 16-byte copies per row
  static constexpr int TPR = THREADS / BN;         // threads per weight row (adjacent lanes)
  static constexpr int DP = 8 / TPR;               // B pieces each thread decodes per step
  static constexpr int A_BYTES = BM * kRowBytes, B_BYTES = BN * kRowBytes, RAW_BYTES = BN * RAW_ROW;
  static constexpr int SMEM = A_STAGES * A_BYTES + B_TILES * B_BYTES + RAW_STAGES * RAW_BYTES + 1024;  // + alignment
  static constexpr int AP = BM * 8 / THREADS;  // A pieces per thread and step
  static constexpr int ROW_STEP = THREADS / 8;
  static_assert(kSuper % F::QK == 0 && F::SUB % 8 == 0 && (DP * 8) % F::SUB == 0,
                "a raw stage holds whole blocks; a thread's pieces whole sub-blocks");
  static_assert(AP * THREADS == BM * 8 && TPR * BN == THREADS && DP * TPR == 8, "pieces split evenly");
  static_assert(A_BYTES % 1024 == 0 && B_BYTES % 1024 == 0, "swizzle atoms stay 1024-aligned");
  static_assert(BM * (BN + 8) * 4 <= A_STAGES * A_BYTES + B_TILES * B_BYTES, "the epilogue's staging fits");
  static_assert(SMEM <= 227 * 1024, "fits Hopper's shared memory");
};

// Elements i0 .. i0+7 of block b (one sub-block, scale a, min m) rounded once to D, packed. Equal to
// decode8_rounded: for the formats with mins (Q2_K, Q4_K, Q5_K) a * q is exact in f32 (a = d * sc
// has at most 11 + 6 significant bits, q at most 5), so fma(a, q, -m) rounds a * q - m once, as the
// unfused expression does.
template <class F, DType D>
__device__ __forceinline__ uint4 decode8_fma(const typename F::Block& b, int i0, float a, float m) {
  const uint64_t q = F::quant8(b, i0);
  const uint32_t lo = static_cast<uint32_t>(q) ^ 0x80808080u, hi = static_cast<uint32_t>(q >> 32) ^ 0x80808080u;
  float v[8];
#pragma unroll
  for (int t = 0; t < 8; ++t) {
    const uint32_t bits = __byte_perm(t < 4 ? lo : hi, 0x4B000000u, 0x7540u | (t & 3));
    const float qf = __fsub_rn(__uint_as_float(bits), 8388736.0f);  // exact: q
    v[t] = F::HAS_MIN ? __fmaf_rn(a, qf, -m) : __fmul_rn(a, qf);
  }
  return make_uint4(round2<D>(v[0], v[1]), round2<D>(v[2], v[3]), round2<D>(v[4], v[5]), round2<D>(v[6], v[7]));
}

template <class F, DType D, class C>
__global__ void __launch_bounds__(C::THREADS, 1) grouped_wgmma_gguf_kernel(GemmArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Block = typename F::Block;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw_addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t a_ring = (raw_addr + 1023u) & ~1023u;
  const uint32_t b_tiles = a_ring + C::A_STAGES * C::A_BYTES;
  const uint32_t raw_ring = b_tiles + C::B_TILES * C::B_BYTES;
  uint8_t* const smem = smem_raw + (a_ring - raw_addr);  // generic pointer of a_ring
  uint8_t* const b_gen = smem + (b_tiles - a_ring);
  const uint8_t* const raw_gen = smem + (raw_ring - a_ring);

  int64_t e, row0, rows;
  if (!find_tile<C::BM>(a, blockIdx.x, e, row0, rows)) return;
  const int tid = threadIdx.x, wgi = tid / 128;
  const bool mma = wgi < C::MMA_WG;           // warpgroup-uniform
  const int piece = tid % 8, prow = tid / 8;  // this thread's x piece column and first tile row
  const int wrow = tid / C::TPR, half = tid % C::TPR;  // the weight row this thread copies and decodes

  // x rows of this thread's A pieces (nullptr: no pair there, the piece is zero-filled).
  const auto* x = static_cast<const uint16_t*>(a.x);
  const uint16_t* xsrc[C::AP];
#pragma unroll
  for (int i = 0; i < C::AP; ++i) {
    const int r = prow + i * C::ROW_STEP;
    const int64_t pair = r < rows ? a.perm[row0 + r] : -1;
    xsrc[i] = pair < 0 ? nullptr : x + (a.x_per_pair ? pair : pair / a.k) * a.K + piece * 8;
  }
  __shared__ int64_t pair_of[C::BM];
  __shared__ float score_of[C::BM];
  hop::tile_pairs<C::BM>(a, row0, rows, pair_of, score_of);

  const auto* w = static_cast<const uint8_t*>(a.w);
  const uint8_t* const w_end = w + a.E * a.N * a.row_bytes;
  const int KT = static_cast<int>((a.K + BK - 1) / BK);

  for (int64_t n0 = int64_t{blockIdx.y} * C::BN; n0 < a.N; n0 += int64_t{gridDim.y} * C::BN) {
    float acc[C::BN / 2];
#pragma unroll
    for (int i = 0; i < C::BN / 2; ++i) acc[i] = 0.0f;
    const bool row_in = n0 + wrow < a.N;
    const uint8_t* const wr = w + (e * a.N + n0 + wrow) * a.row_bytes;  // this thread's weight row

    // Copies of step j: its x pieces, and at the first step of a super-step this thread's share of
    // its weight row's raw bytes for those 256 K elements.
    auto copy_step = [&](int j) {
      const int64_t k0 = int64_t{j} * BK;
      const uint32_t sa = a_ring + (j % C::A_STAGES) * C::A_BYTES;
      const bool k_in = k0 + piece * 8 < a.K;  // K % 8 == 0: a piece is all in or all out
#pragma unroll
      for (int i = 0; i < C::AP; ++i) {
        const bool ok = k_in && xsrc[i] != nullptr;
        hop::cp_async16(sa + swizzled(prow + i * C::ROW_STEP, piece), ok ? xsrc[i] + k0 : a.x, ok);
      }
      if (j % kStepsPerSuper != 0 || !row_in) return;
      const int64_t s = j / kStepsPerSuper;
      const int64_t kbeg = s * kSuper;
      const int len = static_cast<int>((a.K - kbeg < kSuper ? a.K - kbeg : kSuper) / F::QK * C::BB);
      const uint8_t* chunk = wr + kbeg / F::QK * C::BB;
      const int off = static_cast<int>(reinterpret_cast<uintptr_t>(chunk) & 15);
      const uint8_t* src = chunk - off;
      const uint32_t dst = raw_ring + static_cast<uint32_t>(s % C::RAW_STAGES) * C::RAW_BYTES + wrow * C::RAW_ROW;
#pragma unroll
      for (int pc = half; pc < C::RAW_PIECES; pc += C::TPR) {
        if (16 * pc >= off + len) break;  // past this row's chunk
        const int64_t left = w_end - (src + 16 * pc);  // never read past the weights
        hop::cp_async16(dst + 16 * pc, src + 16 * pc, static_cast<int>(left < 16 ? left : 16));
      }
    };

    // Step j's B tile: this thread's pieces of its weight row decoded from the raw stage.
    auto decode_step = [&](int j) {
      const int64_t s = j / kStepsPerSuper;
      uint8_t* bt = b_gen + (j % C::B_TILES) * C::B_BYTES;
      const uint8_t* chunk = wr + s * (kSuper / F::QK) * C::BB;
      const uint8_t* mine = raw_gen + (s % C::RAW_STAGES) * C::RAW_BYTES + wrow * C::RAW_ROW +
                            (reinterpret_cast<uintptr_t>(chunk) & 15);
      const int kc0 = (j % kStepsPerSuper) * BK + half * C::DP * 8;  // first K element inside the chunk
      const bool k_in = int64_t{j} * BK + half * C::DP * 8 < a.K;  // pieces come in whole sub-blocks
#pragma unroll
      for (int g = 0; g < C::DP; g += F::SUB / 8) {  // one sub-block: one scale and min
        const int kc = kc0 + g * 8;
        const auto& blk = *reinterpret_cast<const Block*>(mine + (kc / F::QK) * C::BB);
        float sc = 0.0f, mn = 0.0f;
        if (row_in && k_in) F::scale_min(blk, (kc % F::QK) / F::SUB, sc, mn);
#pragma unroll
        for (int p = g; p < g + F::SUB / 8; ++p) {
          const uint4 v = row_in && k_in ? decode8_fma<F, D>(blk, (kc % F::QK) + (p - g) * 8, sc, mn)
                                         : make_uint4(0, 0, 0, 0);
          *reinterpret_cast<uint4*>(bt + swizzled(wrow, half * C::DP + p)) = v;
        }
      }
    };

#pragma unroll 1
    for (int j = 0; j < C::AHEAD; ++j) {
      if (j < KT) copy_step(j);
      hop::cp_async_commit();
    }
    hop::cp_async_wait<C::AHEAD - 1>();  // this thread's copies of step 0 landed
    __syncwarp();                         // and its row partner's
    decode_step(0);
    hop::fence_async_smem();
    __syncthreads();  // B[0] and the x pieces of step 0 are visible to the tensor cores
#pragma unroll 1
    for (int j = 0; j < KT; ++j) {
      if (mma) {
        const uint32_t sa = a_ring + (j % C::A_STAGES) * C::A_BYTES + wgi * 64 * kRowBytes;
        const uint32_t sb = b_tiles + (j % C::B_TILES) * C::B_BYTES;
        hop::wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk)
          Wgmma<D, C::BN>::mma(acc, hop::smem_desc(sa + kk * 32), hop::smem_desc(sb + kk * 32));
        hop::wgmma_commit();
      }
      if (j + C::AHEAD < KT) copy_step(j + C::AHEAD);
      hop::cp_async_commit();
      if (mma) hop::wgmma_wait<1>();  // wgmma j - 1 is done: its x slot and B tile are free
      if (j + 1 < KT) {
        hop::cp_async_wait<C::AHEAD - 1>();  // this thread's copies of step j + 1 landed
        __syncwarp();
        decode_step(j + 1);
        hop::fence_async_smem();
      }
      __syncthreads();  // B[(j + 1) % 3] and step j + 1's x pieces are visible; every wgmma <= j - 1 is done
    }
    if (mma) hop::wgmma_wait<0>();
    hop::epilogue<C::BM, C::BN, C::THREADS>(a, acc, reinterpret_cast<float*>(smem), pair_of, score_of, n0);
  }
#else
  __trap();  // launched only where the device and the build have sm_90a (plan.h: CudaDevice::hopper)
#endif
}

template <class F, DType D, class C>
std::string launch_tile(const MoeProblem& p, const GemmArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(max_m_tiles(p, C::BM)), grid_y((p.N + C::BN - 1) / C::BN));
  const cudaError_t err = cudaFuncSetAttribute(grouped_wgmma_gguf_kernel<F, D, C>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
  if (err != cudaSuccess) return std::string("grouped_wgmma_gguf_kernel shared memory: ") + cudaGetErrorString(err);
  grouped_wgmma_gguf_kernel<F, D, C><<<grid, C::THREADS, C::SMEM, stream>>>(a);
  return launch_error("grouped_wgmma_gguf_kernel");
}

template <DType D>
std::string launch_for_dtype(const MoeProblem& p, const GemmArgs& a, GemmTile tile, cudaStream_t stream) {
  std::string err = "internal: grouped_wgmma_gguf_kernel has no tile " + std::to_string(static_cast<int>(tile));
  const bool known = dispatch_format(p.wtype, [&](auto fmt) {
    using F = decltype(fmt);
    if (tile == GemmTile::kGguf64x128) err = launch_tile<F, D, GgufTile<F, 1>>(p, a, stream);
    else if (tile == GemmTile::kGguf128x128) err = launch_tile<F, D, GgufTile<F, 2>>(p, a, stream);
  });
  if (!known) return "internal: grouped_wgmma_gguf_kernel has no GGUF format " + std::to_string(static_cast<int>(p.wtype));
  return err;
}

}  // namespace

std::string launch_wgmma_gguf(const MoeProblem& p, const GemmArgs& a, const CudaPlan& plan, cudaStream_t stream) {
  return p.x_dtype == DType::F16 ? launch_for_dtype<DType::F16>(p, a, plan.tile, stream)
                                 : launch_for_dtype<DType::BF16>(p, a, plan.tile, stream);
}

}  // namespace jax_moe
