// WMMA_GGUF on Hopper: the grouped GEMM on wgmma (sm_90a) with the GGUF blocks decoded inside it.
//
// The GEMM reads only the quantized bytes. Per block: a BM x 128 tile of one expert (BM = 64 pairs
// per warpgroup), K in steps of 64. Three shared-memory regions:
//   - a ring of A_STAGES x tiles (gathered rows, 128-byte swizzle), cp.async AHEAD steps ahead;
//   - a ring of RAW_STAGES raw stages: each holds, for the tile's 128 weight rows, the GGUF bytes of
//     256 K elements (one super-block, or 8 blocks of 32), copied as stored with cp.async in
//     16-byte pieces (a row's bytes keep their address mod 16, so every format's block alignment
//     holds in shared memory as in global memory);
//   - two bf16/f16 B tiles (128 rows x 64, swizzled): at step j the threads decode step j's 64 K
//     elements of every row from the raw stage into B[j % 2] (ggml's formulas, one rounding:
//     decode.cuh), while the tensor cores still work on step j - 1.
// Numerics are those of the contract (DESIGN.md §4): weights decoded exactly and rounded once to
// x's dtype, products and accumulation in f32, one rounding at the end (the epilogue is wgmma.cu's).
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

template <class F, int WG_>
struct GgufTile {
  using Block = typename F::Block;
  static constexpr int BM = 64 * WG_, BN = 128, THREADS = 128 * WG_;
  static constexpr int AHEAD = 3;             // K steps whose copies are in flight
  static constexpr int A_STAGES = AHEAD + 2;  // the slot step j + AHEAD fills was last read by wgmma j - 2
  static constexpr int RAW_STAGES = 2;        // the stage super-step s + 2 fills was last decoded from at step 4s + 3
  static constexpr int BB = sizeof(Block);
  static constexpr int CHUNK = kSuper / F::QK * BB;  // bytes of one row per raw stage
  // A row's chunk starts at a multiple of gcd(BB, 16) (rows are whole blocks, the buffer is
  // 16-byte aligned): the copy starts at the 16-byte boundary below it.
  static constexpr int MAX_OFF = 16 - gcd16(BB);
  static constexpr int RAW_ROW = (CHUNK + MAX_OFF % 16 + 15) / 16 * 16;
  static constexpr int RAW_PIECES = RAW_ROW / 16;  // 16-byte copies per row
  static constexpr int A_BYTES = BM * kRowBytes, B_BYTES = BN * kRowBytes, RAW_BYTES = BN * RAW_ROW;
  static constexpr int SMEM = A_STAGES * A_BYTES + 2 * B_BYTES + RAW_STAGES * RAW_BYTES + 1024;  // + alignment slack
  static constexpr int AP = BM * 8 / THREADS;  // A pieces per thread and step
  static constexpr int DP = BN * 8 / THREADS;  // B pieces each thread decodes per step
  static constexpr int ROW_STEP = THREADS / 8;
  static_assert(kSuper % F::QK == 0 && F::SUB % 8 == 0, "a raw stage holds whole blocks; a piece one sub-block");
  static_assert(AP * THREADS == BM * 8 && DP * THREADS == BN * 8, "pieces split evenly");
  static_assert(A_BYTES % 1024 == 0 && B_BYTES % 1024 == 0, "swizzle atoms stay 1024-aligned");
  static_assert(BM * (BN + 8) * 4 <= A_STAGES * A_BYTES, "the epilogue's staging fits the x ring");
  static_assert(SMEM <= 227 * 1024, "fits Hopper's shared memory");
};

template <class F, DType D, class C>
__global__ void __launch_bounds__(C::THREADS, 1) grouped_wgmma_gguf_kernel(GemmArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Block = typename F::Block;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw_addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t a_ring = (raw_addr + 1023u) & ~1023u;
  const uint32_t b_tiles = a_ring + C::A_STAGES * C::A_BYTES;
  const uint32_t raw_ring = b_tiles + 2 * C::B_BYTES;
  uint8_t* const smem = smem_raw + (a_ring - raw_addr);  // generic pointer of a_ring
  uint8_t* const b_gen = smem + (b_tiles - a_ring);
  const uint8_t* const raw_gen = smem + (raw_ring - a_ring);

  int64_t e, row0, rows;
  if (!find_tile<C::BM>(a, blockIdx.x, e, row0, rows)) return;
  const int tid = threadIdx.x, wgi = tid / 128;
  const int piece = tid % 8, prow = tid / 8;  // this thread's piece column and first tile row

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
    __syncthreads();  // pair_of / score_of are written (first tile)

    // Copies of step j: its x pieces, and at the first step of a super-step the raw GGUF bytes of
    // its 256 K elements for every row of the tile.
    auto copy_step = [&](int j) {
      const int64_t k0 = int64_t{j} * BK;
      const uint32_t sa = a_ring + (j % C::A_STAGES) * C::A_BYTES;
      const bool k_in = k0 + piece * 8 < a.K;  // K % 8 == 0: a piece is all in or all out
#pragma unroll
      for (int i = 0; i < C::AP; ++i) {
        const bool ok = k_in && xsrc[i] != nullptr;
        hop::cp_async16(sa + swizzled(prow + i * C::ROW_STEP, piece), ok ? xsrc[i] + k0 : a.x, ok);
      }
      if (j % kStepsPerSuper != 0) return;
      const int64_t s = j / kStepsPerSuper;
      const int64_t kbeg = s * kSuper;
      const int64_t len = (a.K - kbeg < kSuper ? a.K - kbeg : kSuper) / F::QK * C::BB;  // this chunk's bytes
      const uint32_t dst = raw_ring + static_cast<uint32_t>(s % C::RAW_STAGES) * C::RAW_BYTES;
#pragma unroll 1
      for (int q = tid; q < C::BN * C::RAW_PIECES; q += C::THREADS) {
        const int r = q / C::RAW_PIECES, pc = q % C::RAW_PIECES;
        if (n0 + r >= a.N) continue;
        const uint8_t* chunk = w + (e * a.N + n0 + r) * a.row_bytes + kbeg / F::QK * C::BB;
        const int off = static_cast<int>(reinterpret_cast<uintptr_t>(chunk) & 15);
        if (16 * pc >= off + len) continue;  // past this row's chunk
        const uint8_t* src = chunk - off + 16 * pc;
        const int64_t left = w_end - src;  // never read past the weights
        hop::cp_async16(dst + r * C::RAW_ROW + 16 * pc, src, static_cast<int>(left < 16 ? left : 16));
      }
    };

    // Step j's B tile: every row's 64 K elements decoded from the raw stage into B[j % 2].
    auto decode_step = [&](int j) {
      const int64_t s = j / kStepsPerSuper;
      const int kl = (j % kStepsPerSuper) * BK;  // first K element of the step inside the chunk
      const uint8_t* stage = raw_gen + (s % C::RAW_STAGES) * C::RAW_BYTES;
      uint8_t* bt = b_gen + (j % 2) * C::B_BYTES;
#pragma unroll
      for (int i = 0; i < C::DP; ++i) {
        const int r = prow + i * C::ROW_STEP;
        const int64_t n = n0 + r;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (n < a.N && int64_t{j} * BK + piece * 8 < a.K) {
          const uintptr_t chunk = reinterpret_cast<uintptr_t>(w + (e * a.N + n) * a.row_bytes) +
                                  static_cast<uintptr_t>(s * (kSuper / F::QK) * C::BB);
          const int kc = kl + piece * 8;
          const auto& blk =
              *reinterpret_cast<const Block*>(stage + r * C::RAW_ROW + (chunk & 15) + (kc / F::QK) * C::BB);
          const int i0 = kc % F::QK;
          float sc, mn;
          F::scale_min(blk, i0 / F::SUB, sc, mn);
          v = decode8_rounded<F, D>(blk, i0, sc, mn);
        }
        *reinterpret_cast<uint4*>(bt + swizzled(r, piece)) = v;
      }
    };

#pragma unroll 1
    for (int j = 0; j < C::AHEAD; ++j) {
      if (j < KT) copy_step(j);
      hop::cp_async_commit();
    }
#pragma unroll 1
    for (int j = 0; j < KT; ++j) {
      hop::cp_async_wait<C::AHEAD - 1>();  // this thread's copies of steps <= j landed
      __syncthreads();  // everyone's copies landed; wgmma j - 2 is done in every warpgroup
      decode_step(j);
      hop::fence_async_smem();  // the decoded tile and the copied x pieces are visible to the tensor cores
      __syncthreads();
      const uint32_t sa = a_ring + (j % C::A_STAGES) * C::A_BYTES + wgi * 64 * kRowBytes;
      const uint32_t sb = b_tiles + (j % 2) * C::B_BYTES;
      hop::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk)
        Wgmma<D, C::BN>::mma(acc, hop::smem_desc(sa + kk * 32), hop::smem_desc(sb + kk * 32));
      hop::wgmma_commit();
      if (j + C::AHEAD < KT) copy_step(j + C::AHEAD);
      hop::cp_async_commit();
      hop::wgmma_wait<1>();  // wgmma j - 1 is done: its x slot and B tile may be refilled after the next barrier
    }
    hop::wgmma_wait<0>();
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
