// WMMA_GGUF on Hopper: the grouped GEMM on wgmma (sm_90a) with the GGUF blocks decoded inside it.
//
// The GEMM reads only the quantized bytes. Per block (128 threads per warpgroup, 64 or 128 pairs per
// warpgroup): a BM x 128 tile of one expert, K in steps of 64. Shared memory holds
//   - a ring of A_STAGES x tiles (gathered rows, 128-byte swizzle), cp.async AHEAD steps ahead;
//   - a ring of raw stages: each holds, for the tile's 128 weight rows, the GGUF bytes of 256 K
//     elements (one super-block, or 8 blocks of 32) as stored, copied with cp.async in 16-byte
//     pieces from the 16-byte boundary below the row's bytes, so that every format's block
//     alignment holds in shared memory as in global memory;
//   - B tiles (128 rows x 64 of x's dtype, swizzled): while the tensor cores work on step j, the
//     threads decode step j + 1's 64 K elements of every row from the raw stage into the next B
//     tile (ggml's formulas, one rounding).
// Each weight row belongs to MMA_WG adjacent lanes of one warp, which copy its raw bytes and decode
// it: they wait for their own copies and meet at __syncwarp, so one block-wide barrier per step
// (making the decoded tile and the x pieces visible to the tensor cores) is all the step needs.
// Between a wgmma's issue and its wait every instruction is predicated, never a thread-dependent
// branch: ptxas serializes wgmma across divergent code (its warning C7518).
// Numerics are the contract's (docs/contract.md §4): weights decoded exactly and rounded once to x's
// dtype, products and accumulation in f32, one rounding at the end (wgmma_common.cuh's epilogue).
#include <type_traits>

#include "../common/gguf_formats.h"
#include "common.cuh"
#include "decode.cuh"
#include "grouped_gemm.cuh"
#include "kernels.h"
#include "raster.h"
#include "wgmma_common.cuh"
#include "wgmma_ops.cuh"

namespace jax_moe {
namespace gguf_gemm {  // named: tiles that Deepest only sizes keep external linkage (no unused-member warnings)

using hop::BK;
using hop::kRowBytes;

constexpr int kSuper = 256;                  // K elements of one raw stage
constexpr int kStepsPerSuper = kSuper / BK;  // K steps per raw stage

// MMA_WG warpgroups, each holding MI m64 x 128 accumulator blocks (MI = 2: the 256-row tile, whose
// decoded B tile serves twice the pairs of the 128-row one).
// AHEAD_: the K steps of x copies in flight, 0 for the tile's default (below).
template <class F, int MMA_WG_, int MI_, int RAW_STAGES_, int RAW_LEAD_, int AHEAD_ = 0>
struct GgufTile {
  using Block = typename F::Block;
  static constexpr int MMA_WG = MMA_WG_, MI = MI_, BM = 64 * MMA_WG_ * MI_, BN = 128, THREADS = 128 * MMA_WG_;
  // One warpgroup: two blocks per SM (shared memory permitting), 2 B tiles (the tile step j + 1
  // fills was last read by wgmma j - 1, which every warp of the one warpgroup has waited for). Two:
  // 3 B tiles (last read by wgmma j - 2, which the block-wide barrier of step j - 1 follows).
  static constexpr int MIN_BLOCKS = MMA_WG == 1 ? 2 : 1;
  static constexpr int B_TILES = MMA_WG == 1 ? 2 : 3;
  // K steps whose copies are in flight (the 256-row tile: one less, for its 32 KiB x stages; one
  // for Q6_K and Q8_0, whose larger raw stages leave room for 3 x stages only: plan.h).
  static constexpr int AHEAD = AHEAD_ > 0 ? AHEAD_ : MMA_WG == 1 ? 2 : MI == 1 ? 3 : 2;
  static constexpr int A_STAGES = AHEAD + 2;         // the slot step j + AHEAD fills was last read by wgmma j - 2
  // Raw stages, and how many K steps earlier than its first step's x pieces a super-step's raw
  // bytes are copied: the copy of super-step s (at loop iteration 4s - RAW_LEAD - AHEAD) must come
  // after the last decode from the stage it reuses (iteration 4(s - RAW_STAGES) + 2).
  static constexpr int RAW_STAGES = RAW_STAGES_, RAW_LEAD = RAW_LEAD_;
  static_assert(RAW_LEAD >= 0 && RAW_LEAD <= 4 * RAW_STAGES - AHEAD - 3, "a raw stage is refilled only once read");
  static constexpr int BB = sizeof(Block);
  // A row's chunk (its bytes of one raw stage) starts at a multiple of gcd(BB, 16) (rows are whole
  // blocks, the buffer is 16-byte aligned): the copy starts at the 16-byte boundary below it.
  static constexpr int RAW_ROW = gguf_raw_row_bytes(BB, F::QK);
  static_assert(kSuper == 256, "plan.h's gguf_raw_row_bytes sizes 256 K elements");
  static constexpr int RAW_PIECES = RAW_ROW / 16;  // 16-byte copies per row
  static constexpr int TPR = THREADS / BN;         // threads per weight row (adjacent lanes)
  static constexpr int RAW_PER_THREAD = (RAW_PIECES + TPR - 1) / TPR;
  static constexpr int DP = 8 / TPR;               // B pieces each thread decodes per step
  static constexpr int A_BYTES = BM * kRowBytes, B_BYTES = BN * kRowBytes, RAW_BYTES = BN * RAW_ROW;
  static constexpr int SMEM = A_STAGES * A_BYTES + B_TILES * B_BYTES + RAW_STAGES * RAW_BYTES + 1024;  // + alignment
  static constexpr int STATIC_SMEM = BM * (8 + 4);  // pair_of, score_of
  static constexpr int AP = BM * 8 / THREADS;  // A pieces per thread and step
  static constexpr int ROW_STEP = THREADS / 8;
  static_assert(ROW_STEP % 8 == 0, "a thread's x pieces share one swizzle (XPieces)");
  static_assert(kSuper % F::QK == 0 && F::SUB % 8 == 0 && (DP * 8) % F::SUB == 0,
                "a raw stage holds whole blocks; a thread's pieces whole sub-blocks");
  static_assert(AP * THREADS == BM * 8 && TPR * BN == THREADS && DP * TPR == 8, "pieces split evenly");
  static_assert(A_BYTES % 1024 == 0 && B_BYTES % 1024 == 0, "swizzle atoms stay 1024-aligned");
  static_assert(BM * (BN + 8) * 4 <= A_STAGES * A_BYTES + B_TILES * B_BYTES, "the epilogue's staging fits");
  // plan.h decides where the 256-row tile runs from its own count of these bytes.
  static_assert(MI == 1 || MMA_WG != 2 || RAW_STAGES != 2 || SMEM + STATIC_SMEM == gguf_tall_smem_bytes(BB, F::QK, A_STAGES),
                "plan.h's gguf_tall_smem_bytes counts this tile's shared memory");
};

}  // namespace gguf_gemm

namespace {

using hop::BK;
using hop::kRowBytes;
using hop::swizzled;

using gguf_gemm::GgufTile;
using gguf_gemm::kSuper;
using gguf_gemm::kStepsPerSuper;

// cp.async of 16 bytes (src_bytes of them read, the rest zero-filled) where pred holds: a
// predicated instruction, not a branch.
__device__ __forceinline__ void cp_async16_if(bool pred, uint32_t dst, const void* src, int src_bytes) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %3, 0;\n@p cp.async.cg.shared.global [%0], [%1], 16, %2;\n}\n" ::"r"(dst),
      "l"(src), "r"(src_bytes), "r"(static_cast<int>(pred))
      : "memory");
}

// F::scale_min without thread-dependent branches (the sub-block index differs between the lanes
// of a row), bit-exact with it: the K4 and Q3_K scale unpacking as selects and shifts.
template <class F>
__device__ __forceinline__ void scale_min_nb(const typename F::Block& b, int s, float& a, float& m) {
  if constexpr (F::type == GGMLType::Q4_K || F::type == GGMLType::Q5_K) {
    const uint8_t* q = b.scales;
    const int x = q[s], y = q[s + 4], z = q[s >= 4 ? s - 4 : s];
    const int sc = s < 4 ? (x & 63) : ((y & 0xF) | ((z >> 6) << 4));
    const int mn = s < 4 ? (y & 63) : ((y >> 4) | ((x >> 6) << 4));
    a = mul_rn(half_to_float(b.d), static_cast<float>(sc));
    m = mul_rn(half_to_float(b.dmin), static_cast<float>(mn));
  } else if constexpr (F::type == GGMLType::Q3_K) {
    const int low = (b.scales[s & 7] >> (4 * (s >> 3))) & 0xF;
    const int high = (b.scales[8 + (s & 3)] >> (2 * (s >> 2))) & 3;
    a = mul_rn(half_to_float(b.d), static_cast<float>((low | (high << 4)) - 32));
    m = 0.0f;
  } else {
    F::scale_min(b, s, a, m);
  }
}

template <class F, DType D, class C>
__global__ void __launch_bounds__(C::THREADS, C::MIN_BLOCKS) grouped_wgmma_gguf_kernel(GemmArgs a) {
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
  // This block's M tile and first N tile, in the grouped order of raster.h.
  const TileCoord tile = raster_tile(int64_t{blockIdx.y} * gridDim.x + blockIdx.x, gridDim.x, gridDim.y, kRasterGroup);
  if (!find_tile<C::BM>(a, tile.m, e, row0, rows)) return;
  const int tid = threadIdx.x, wgi = tid / 128;
  const int piece = tid % 8, prow = tid / 8;  // this thread's x piece column and first tile row
  const int wrow = tid / C::TPR, half = tid % C::TPR;  // the weight row this thread copies and decodes

  const hop::XPieces<C::AP> xp(a, row0, rows, prow, C::ROW_STEP, piece);  // this thread's x pieces
  __shared__ int64_t pair_of[C::BM];
  __shared__ float score_of[C::BM];
  hop::tile_pairs<C::BM>(a, row0, rows, pair_of, score_of);

  const auto* w = static_cast<const uint8_t*>(a.w);
  const uint8_t* const w_end = w + a.E * a.N * a.row_bytes;
  const int KT = static_cast<int>((a.K + BK - 1) / BK);

  for (int64_t n0 = tile.n * C::BN; n0 < a.N; n0 += int64_t{gridDim.y} * C::BN) {
    float acc[C::MI][C::BN / 2];
#pragma unroll
    for (int m = 0; m < C::MI; ++m)
#pragma unroll
      for (int i = 0; i < C::BN / 2; ++i) acc[m][i] = 0.0f;
    const bool row_in = n0 + wrow < a.N;
    const uint8_t* const wr = w + (e * a.N + n0 + wrow) * a.row_bytes;  // this thread's weight row

    // This thread's share of its weight row's raw bytes for the 256 K elements of super-step s.
    auto copy_raw = [&](int64_t s) {
      const int64_t kbeg = s * kSuper;
      const int len = static_cast<int>((a.K - kbeg < kSuper ? a.K - kbeg : kSuper) / F::QK * C::BB);
      const uint8_t* chunk = wr + kbeg / F::QK * C::BB;
      const int off = static_cast<int>(reinterpret_cast<uintptr_t>(chunk) & 15);
      const uint8_t* src = chunk - off;
      const uint32_t dst = raw_ring + static_cast<uint32_t>(s % C::RAW_STAGES) * C::RAW_BYTES + wrow * C::RAW_ROW;
#pragma unroll
      for (int i = 0; i < C::RAW_PER_THREAD; ++i) {
        const int pc = half + i * C::TPR;
        const bool ok = row_in && pc < C::RAW_PIECES && 16 * pc < off + len;  // inside this row's chunk
        const int64_t left = ok ? w_end - (src + 16 * pc) : 0;  // never read past the weights
        cp_async16_if(ok, dst + 16 * pc, ok ? src + 16 * pc : w, static_cast<int>(left < 16 ? left : 16));
      }
    };
    // Copies of step j: its x pieces, and the raw bytes of the super-steps due with it (super-step
    // s with step max(0, 4s - RAW_LEAD)).
    auto copy_step = [&](int j) {
      const int64_t k0 = int64_t{j} * BK;
      const uint32_t sa = a_ring + (j % C::A_STAGES) * C::A_BYTES;
      xp.copy(a, sa, prow, C::ROW_STEP, piece, k0);
      if (j == 0) {
        for (int64_t s = 0; s * kSuper < a.K && 4 * s <= C::RAW_LEAD; ++s) copy_raw(s);
      } else if ((j + C::RAW_LEAD) % kStepsPerSuper == 0 && int64_t{j + C::RAW_LEAD} * BK < a.K) {
        copy_raw((j + C::RAW_LEAD) / kStepsPerSuper);
      }
    };

    // Step j's B tile: this thread's pieces of its weight row decoded from the raw stage. Every
    // shared-memory read (scales, quants) is issued before the first store, so that they are in
    // flight together.
    auto decode_step = [&](int j) {
      constexpr int PPS = F::SUB / 8;            // pieces per sub-block
      constexpr int NSUB = C::DP / PPS;          // sub-blocks of this thread's pieces
      const int64_t s = j / kStepsPerSuper;
      uint8_t* bt = b_gen + (j % C::B_TILES) * C::B_BYTES;
      const int kc0 = (j % kStepsPerSuper) * BK + half * C::DP * 8;  // first K element inside the chunk
      // Rows past N and K elements past K (K % 32 == 0: a sub-block is all in or all out) decode
      // whatever the stage holds there and are then replaced by zeros: a select, not a branch.
      const int64_t k_first = int64_t{j} * BK + half * C::DP * 8;  // K index of this thread's first piece
      const uint8_t* chunk = wr + s * (kSuper / F::QK) * C::BB;
      const uint8_t* mine = raw_gen + (s % C::RAW_STAGES) * C::RAW_BYTES + wrow * C::RAW_ROW +
                            (reinterpret_cast<uintptr_t>(chunk) & 15);
      // MXFP4 with bf16 activations: the E2M1 codes straight to bf16 and bf16 products by the
      // block's scale factors (decode.cuh mxfp4_bf16_scaled, as the tensor-core GEMV's rare path):
      // both products always, since a select between one and two products computed both.
      constexpr bool kMxfp4Bf16 = F::type == GGMLType::MXFP4 && D == DType::BF16;
      float sc[NSUB], mn[NSUB];
      uint8_t ex[NSUB];
      uint64_t q[C::DP];
#pragma unroll
      for (int g = 0; g < NSUB; ++g) {
        const int kc = kc0 + g * F::SUB;
        const auto& blk = *reinterpret_cast<const Block*>(mine + (kc / F::QK) * C::BB);
        if constexpr (kMxfp4Bf16) {
          ex[g] = blk.e;
#pragma unroll
          for (int p = 0; p < PPS; ++p) q[g * PPS + p] = F::codes8(blk, kc % F::QK + 8 * p);
        } else {
          scale_min_nb<F>(blk, (kc % F::QK) / F::SUB, sc[g], mn[g]);
          if constexpr (F::type == GGMLType::Q8_0) {
            q8_0_pieces(blk, q + g * PPS);  // the block's 32 quants as words, not 2-byte loads
          } else if constexpr (F::type != GGMLType::Q3_K && F::type != GGMLType::Q6_K) {
#pragma unroll
            for (int p = 0; p < PPS; ++p) q[g * PPS + p] = F::quant8(blk, kc % F::QK + 8 * p);
          }
        }
      }
      // Q3_K and Q6_K: the thread's pieces all lie in one block, whose bytes they need are read
      // once as words (gguf_formats.h q3k_pieces, q6k_pieces), not as 2-byte loads per piece.
      if constexpr (F::type == GGMLType::Q3_K || F::type == GGMLType::Q6_K) {
        const auto& blk = *reinterpret_cast<const Block*>(mine + (kc0 / F::QK) * C::BB);
        if constexpr (F::type == GGMLType::Q3_K) q3k_pieces<C::DP>(blk, kc0 % F::QK, q);
        else q6k_pieces<C::DP>(blk, kc0 % F::QK, q);
      }
#pragma unroll
      for (int p = 0; p < C::DP; ++p) {
        uint4 v;
        if constexpr (kMxfp4Bf16) {
          const uint8_t e = ex[p / PPS];
          const Bf16x2x4 b = e2m1_bf16x8(static_cast<uint32_t>(q[p]), static_cast<uint32_t>(q[p] >> 32));
          v = mxfp4_bf16_scaled<true>(b, mxfp4_bf16_scale(e));  // s2 = 1 where e <= 128: exact
        } else {
          v = decode_quants8<F, D>(q[p], sc[p / PPS], mn[p / PPS]);
        }
        const bool live = row_in && k_first + 8 * p < a.K;
        *reinterpret_cast<uint4*>(bt + swizzled(wrow, half * C::DP + p)) = live ? v : make_uint4(0, 0, 0, 0);
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
      const uint32_t sa = a_ring + (j % C::A_STAGES) * C::A_BYTES + wgi * C::MI * 64 * kRowBytes;
      const uint32_t sb = b_tiles + (j % C::B_TILES) * C::B_BYTES;
#pragma unroll
      for (int m = 0; m < C::MI; ++m) hop::fence_operands(acc[m]);
      hop::wgmma_fence();
      const uint64_t da = hop::smem_desc(sa), db = hop::smem_desc(sb);
#pragma unroll
      for (int m = 0; m < C::MI; ++m)
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk)
          Wgmma<D, C::BN>::mma(acc[m], hop::desc_plus(da, m * 64 * kRowBytes + kk * 32), hop::desc_plus(db, kk * 32));
      hop::wgmma_commit();
#pragma unroll
      for (int m = 0; m < C::MI; ++m) hop::fence_operands(acc[m]);
      if (j + C::AHEAD < KT) copy_step(j + C::AHEAD);
      hop::cp_async_commit();
      hop::wgmma_wait<1>();  // wgmma j - 1 is done: its x slot and B tile are free
      if (j + 1 < KT) {
        hop::cp_async_wait<C::AHEAD - 1>();  // this thread's copies of step j + 1 landed
        __syncwarp();                         // and its row partners'
        decode_step(j + 1);
        hop::fence_async_smem();
      }
      __syncthreads();  // the next B tile and step j + 1's x pieces are visible; every wgmma <= j - 1 is done
    }
    hop::wgmma_wait<0>();
#pragma unroll
    for (int m = 0; m < C::MI; ++m) hop::fence_operands(acc[m]);
    hop::epilogue<C::BM, C::BN, C::THREADS>(a, acc, reinterpret_cast<float*>(smem), pair_of, score_of, n0);
  }
#else
  __trap();  // launched only where the device and the build have sm_90a (plan.h: CudaDevice::hopper)
#endif
}

template <class F, DType D, class C>
std::string launch_tile(const MoeProblem& p, const GemmArgs& a, cudaStream_t stream) {
  static_assert(C::SMEM + C::STATIC_SMEM <= 227 * 1024, "fits Hopper's shared memory");
  const dim3 grid(static_cast<unsigned>(max_m_tiles(p, C::BM)), grid_y((p.N + C::BN - 1) / C::BN));
  const cudaError_t err = cudaFuncSetAttribute(grouped_wgmma_gguf_kernel<F, D, C>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
  if (err != cudaSuccess) return std::string("grouped_wgmma_gguf_kernel shared memory: ") + cudaGetErrorString(err);
  grouped_wgmma_gguf_kernel<F, D, C><<<grid, C::THREADS, C::SMEM, stream>>>(a);
  return launch_error("grouped_wgmma_gguf_kernel");
}

// The fixed part of a tile's pipeline (AHEAD), before its raw ring is chosen.
template <class F, int MMA_WG, int MI, int AH = 0>
using Tile0 = GgufTile<F, MMA_WG, MI, 2, 0, AH>;

// The deepest raw ring that fits one block per SM (2 to 4 stages), with the longest lead it allows.
template <class F, int MMA_WG, int MI, int AH = 0, int RS = 4>
struct Deepest {
  using Tile = GgufTile<F, MMA_WG, MI, RS, 4 * RS - Tile0<F, MMA_WG, MI, AH>::AHEAD - 3, AH>;
  using type = typename std::conditional<(Tile::SMEM + Tile::STATIC_SMEM <= kHopperSmemBytes || RS == 2), Tile,
                                         typename Deepest<F, MMA_WG, MI, AH, (RS > 2 ? RS - 1 : 2)>::type>::type;
};
template <class F, int MMA_WG, int MI, int AH>
struct Deepest<F, MMA_WG, MI, AH, 2> {
  using type = GgufTile<F, MMA_WG, MI, 2, 4 * 2 - Tile0<F, MMA_WG, MI, AH>::AHEAD - 3, AH>;
};

// The 256-row tile: x copies two steps ahead where the format's raw stages leave room for 4 x
// stages, else one (plan.h gguf_tall_x_stages).
template <class F>
using Tall = typename Deepest<F, 2, 2, gguf_tall_x_stages(F::type) - 2>::type;

// The 64-row tile: two blocks per SM with 2 raw stages where the format allows it, else the
// deepest ring of one block per SM.
template <class F>
struct Narrow {
  using Two = GgufTile<F, 1, 1, 2, 3>;
  static constexpr bool fits = Two::SMEM + Two::STATIC_SMEM + 1024 <= 228 * 1024 / 2;
  using type = typename std::conditional<fits, Two, typename Deepest<F, 1, 1>::type>::type;
};

template <DType D>
std::string launch_for_dtype(const MoeProblem& p, const GemmArgs& a, GemmTile tile, cudaStream_t stream) {
  std::string err = "internal: grouped_wgmma_gguf_kernel has no tile " + std::to_string(static_cast<int>(tile));
  const bool known = dispatch_format(p.wtype, [&](auto fmt) {
    using F = decltype(fmt);
    if (tile == GemmTile::kGguf64x128) {
      err = launch_tile<F, D, typename Narrow<F>::type>(p, a, stream);
    } else if (tile == GemmTile::kGguf128x128) {
      err = launch_tile<F, D, typename Deepest<F, 2, 1>::type>(p, a, stream);
    } else if (tile == GemmTile::kGguf256x128) {
      if constexpr (gguf_tall_fits(F::type))  // plan.h: every format, Q6_K and Q8_0 with 3 x stages
        err = launch_tile<F, D, Tall<F>>(p, a, stream);
    }
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
