// WMMA and WMMA_GGUF on Hopper: the grouped GEMM on wgmma (sm_90a).
//
// Same contract as wmma.cu (products of x and w as stored, f32 accumulation, one rounding); the
// kind names the numerics, not the instruction. Block (m, n) computes a BM x BN tile of one expert,
// BM = 64 pairs per warpgroup; plan.h picks the tile.
// Each K step of 64 is one 128-byte row per tile row, laid out in shared memory with the
// 128-byte swizzle that wgmma's descriptors name, in a ring of STAGES buffers. x pieces (gathered
// rows, zero-filled outside the tile) and weights arrive with cp.async, STAGES - 1 steps ahead.
// The accumulators leave through shared memory, so that each row is written with 16-byte stores.
#include "common.cuh"
#include "grouped_gemm.cuh"
#include "kernels.h"
#include "raster.h"
#include "wgmma_common.cuh"
#include "wgmma_ops.cuh"

namespace jax_moe {
namespace {

using hop::BK;
using hop::kRowBytes;
using hop::cp_async16;
using hop::cp_async_commit;
using hop::cp_async_wait;
using hop::smem_desc;
using hop::swizzled;

template <int WG_, int BN_, int STAGES_>
struct HopperTile {
  static constexpr int BM = 64 * WG_, BN = BN_, STAGES = STAGES_, THREADS = 128 * WG_;
  static constexpr int A_BYTES = BM * kRowBytes, B_BYTES = BN * kRowBytes, STAGE_BYTES = A_BYTES + B_BYTES;
  static constexpr int SMEM = STAGES * STAGE_BYTES + 1024;  // + slack to align the ring to 1024
  static constexpr int AP = BM * 8 / THREADS, BP = BN * 8 / THREADS;  // 16-byte pieces per thread
  static constexpr int ROW_STEP = THREADS / 8;                         // tile rows per piece round
  static_assert(ROW_STEP % 8 == 0, "a thread's x pieces share one swizzle (XPieces)");
  static_assert(AP * THREADS == BM * 8 && BP * THREADS == BN * 8, "pieces split evenly");
  static_assert(A_BYTES % 1024 == 0 && STAGE_BYTES % 1024 == 0, "swizzle atoms stay 1024-aligned");
  static_assert(SMEM <= 227 * 1024, "fits Hopper's shared memory");
  static constexpr int LD = BN + 8;  // row stride (floats) of the epilogue's staging, padded
  static_assert(BM * LD * 4 <= STAGES * STAGE_BYTES, "the epilogue's staging fits the ring");
};
using NarrowTile = HopperTile<1, 256, 5>;  // 64 x 256, when the work is streaming the weights
using SlimTile = HopperTile<1, 128, 8>;    // 64 x 128, when 64 x 256 tiles would leave SMs idle

template <DType D, class C>
__global__ void __launch_bounds__(C::THREADS, 1) grouped_wgmma_kernel(GemmArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t ring = (raw + 1023u) & ~1023u;

  int64_t e, row0, rows;
  // This block's M tile and first N tile, in the grouped order of raster.h.
  const TileCoord tile = raster_tile(int64_t{blockIdx.y} * gridDim.x + blockIdx.x, gridDim.x, gridDim.y, kRasterGroup);
  if (!find_tile<C::BM>(a, tile.m, e, row0, rows)) return;
  const int tid = threadIdx.x, wg = tid / 128;
  const int piece = tid % 8, prow = tid / 8;  // this thread's piece column and first tile row

  const hop::XPieces<C::AP> xp(a, row0, rows, prow, C::ROW_STEP, piece);  // this thread's x pieces
  // Pairs and scores of the tile's rows, for the epilogue.
  __shared__ int64_t pair_of[C::BM];
  __shared__ float score_of[C::BM];
  hop::tile_pairs<C::BM>(a, row0, rows, pair_of, score_of);

  const auto* w = static_cast<const uint16_t*>(a.w);
  const int KT = static_cast<int>((a.K + BK - 1) / BK);
  constexpr int AHEAD = C::STAGES - 1;  // steps loading while one computes
  for (int64_t n0 = tile.n * C::BN; n0 < a.N; n0 += int64_t{gridDim.y} * C::BN) {
    float acc[C::BN / 2];
#pragma unroll
    for (int i = 0; i < C::BN / 2; ++i) acc[i] = 0.0f;

    __syncthreads();  // every thread has read pair_of / score_of (first tile) before the loop
    // Step kt computes once its pieces landed; the first AHEAD rounds only load.
    for (int kt = -AHEAD; kt < KT; ++kt) {
      if (kt >= 0) {
        cp_async_wait<AHEAD - 1>();                                  // this thread's pieces of step kt
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // visible to the tensor cores
        __syncthreads();  // everyone's pieces of step kt landed; every warpgroup finished step kt - 1
        const int s = kt % C::STAGES;
        const uint32_t sa = ring + s * C::STAGE_BYTES + wg * 64 * kRowBytes;
        const uint32_t sb = ring + s * C::STAGE_BYTES + C::A_BYTES;
        const uint64_t da = smem_desc(sa), db = smem_desc(sb);
        hop::fence_operands(acc);
        hop::wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk)
          Wgmma<D, C::BN>::mma(acc, hop::desc_plus(da, kk * 32), hop::desc_plus(db, kk * 32));
        hop::wgmma_commit();
        hop::fence_operands(acc);
      }
      // Load step kt + AHEAD into the buffer of step kt - 1 while the tensor cores work on step kt.
      const int next = kt + AHEAD;
      if (next < KT) {
        const int64_t k0 = int64_t{next} * BK;
        const uint32_t sa = ring + (next % C::STAGES) * C::STAGE_BYTES, sb = sa + C::A_BYTES;
        xp.copy(a, sa, prow, C::ROW_STEP, piece, k0);
        const bool k_in = k0 + piece * 8 < a.K;  // K % 8 == 0: a piece is all in or all out
#pragma unroll
        for (int i = 0; i < C::BP; ++i) {
          const int r = prow + i * C::ROW_STEP;
          const bool ok = k_in && n0 + r < a.N;
          cp_async16(sb + swizzled(r, piece), ok ? w + (e * a.N + n0 + r) * a.K + k0 + piece * 8 : a.w, ok);
        }
      }
      cp_async_commit();
      if (kt >= 0) hop::wgmma_wait<0>();
    }
    hop::wgmma_wait<0>();  // (already done; with it ptxas inserts no wait of its own, C7517)
    hop::fence_operands(acc);

    hop::epilogue<C::BM, C::BN, C::THREADS>(a, acc, reinterpret_cast<float*>(smem_raw + (ring - raw)), pair_of,
                                           score_of, n0);
  }
#else
  __trap();  // launched only where the device and the build have sm_90a (plan.h: CudaDevice::hopper)
#endif
}

template <DType D, class C>
std::string launch_tile(const MoeProblem& p, const GemmArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(max_m_tiles(p, C::BM)), grid_y((p.N + C::BN - 1) / C::BN));
  const cudaError_t err =
      cudaFuncSetAttribute(grouped_wgmma_kernel<D, C>, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
  if (err != cudaSuccess) return std::string("grouped_wgmma_kernel shared memory: ") + cudaGetErrorString(err);
  grouped_wgmma_kernel<D, C><<<grid, C::THREADS, C::SMEM, stream>>>(a);
  return launch_error("grouped_wgmma_kernel");
}

template <DType D>
std::string launch_for_dtype(const MoeProblem& p, const GemmArgs& a, GemmTile tile, cudaStream_t stream) {
  switch (tile) {
    case GemmTile::kWide128x256: return launch_wgmma_ws(p, a, stream);  // wgmma_ws.cu
    case GemmTile::kNarrow64x256: return launch_tile<D, NarrowTile>(p, a, stream);
    case GemmTile::kSlim64x128: return launch_tile<D, SlimTile>(p, a, stream);
    default: return "internal: grouped_wgmma_kernel has no tile " + std::to_string(static_cast<int>(tile));
  }
}

}  // namespace

std::string launch_wgmma(const MoeProblem& p, const GemmArgs& a, const CudaPlan& plan, cudaStream_t stream) {
  return p.x_dtype == DType::F16 ? launch_for_dtype<DType::F16>(p, a, plan.tile, stream)
                                 : launch_for_dtype<DType::BF16>(p, a, plan.tile, stream);
}

}  // namespace jax_moe
