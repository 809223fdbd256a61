// WMMA on Hopper, many pairs per expert (plan.h's 128 x 256 tile): the grouped GEMM with a
// producer warpgroup and two consumer warpgroups (warp specialization, as CUTLASS's
// warp-specialized cooperative kernels and DeepGEMM do; written here for gathered x rows).
//
// Block: one 128 x 256 tile of one expert, K in steps of 64, a ring of STAGES stages in shared
// memory (each: 128 gathered x rows and 256 weight rows of 64 elements, 128-byte swizzled as the
// wgmma descriptors name it). Warpgroups 0 and 1 consume: rows 64 w .. 64 w + 63 of the tile, one
// wgmma group in flight, 224 registers each after `setmaxnreg` (the 64 x 256 accumulators take
// 128). Warpgroup 2 produces with 56 registers:
//   - the weight tile of a stage by TMA (one thread, a 2-D tensor map over the [E N, K] weights),
//     whose bytes complete the stage's `full` mbarrier;
//   - the x rows by cp.async (gathered through the tile's pair permutation, zero-filled outside the
//     tile and past K), each thread arriving on `full` once its copies of that stage have landed
//     and been fenced to the async proxy (LAG stages after issuing them).
// A consumer waits for `full`, issues the stage's four wgmmas, waits for the previous stage's and
// releases that stage on its `empty` mbarrier; the producer waits for `empty` before refilling.
// The accumulators leave through shared memory after a consumer-only named barrier.
// Numerics are the contract's (docs/contract.md §4): products and accumulation in f32, one rounding.
#include <cuda.h>

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
using hop::smem_desc;
using hop::swizzled;

struct WsTile {
  static constexpr int BM = 128, BN = 256, STAGES = 4, LAG = 2;
  static constexpr int CONSUMERS = 2, THREADS = 128 * (CONSUMERS + 1), CONSUMER_THREADS = 128 * CONSUMERS;
  static constexpr int PRODUCER_REGS = 56, CONSUMER_REGS = 224;
  static constexpr int A_BYTES = BM * kRowBytes, B_BYTES = BN * kRowBytes, STAGE_BYTES = A_BYTES + B_BYTES;
  static constexpr int SMEM = STAGES * STAGE_BYTES + 1024;  // + slack to align the ring to 1024
  static constexpr int AP = BM * 8 / 128;                   // x pieces per producer thread and stage
  static constexpr int ROW_STEP = 128 / 8;
  static_assert(ROW_STEP % 8 == 0, "a thread's x pieces share one swizzle (XPieces)");
  static_assert(LAG >= 1 && LAG < STAGES, "the producer releases a stage before it needs that slot again");
  static_assert(A_BYTES % 1024 == 0 && STAGE_BYTES % 1024 == 0, "swizzle atoms stay 1024-aligned");
  static_assert(SMEM <= 227 * 1024, "fits Hopper's shared memory");
  static_assert(BM * (BN + 8) * 4 <= STAGES * STAGE_BYTES, "the epilogue's staging fits the ring");
  static_assert(PRODUCER_REGS * 128 + CONSUMER_REGS * CONSUMER_THREADS <= 65536, "one block per SM");
  static_assert(BN <= 256 && BK * 2 == 128, "one TMA box per stage: 256 rows of 128 bytes");
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Wait until the phase of parity `parity` of the mbarrier has completed (a fresh barrier counts
// its phase before the first as completed, parity 1).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// The box at (k, row) of the 2-D tensor map into shared memory, completing `bar`'s transaction.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int32_t k, int32_t row, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(k), "r"(row), "r"(bar)
      : "memory");
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
#endif

template <DType D>
__global__ void __launch_bounds__(WsTile::THREADS, 1)
    grouped_wgmma_ws_kernel(GemmArgs a, const __grid_constant__ CUtensorMap wmap) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = WsTile;
  extern __shared__ uint8_t smem_raw[];
  __shared__ alignas(8) uint64_t full[C::STAGES], empty[C::STAGES];
  __shared__ int64_t pair_of[C::BM];
  __shared__ float score_of[C::BM];
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t ring = (raw + 1023u) & ~1023u;
  const uint32_t full0 = static_cast<uint32_t>(__cvta_generic_to_shared(&full[0]));
  const uint32_t empty0 = static_cast<uint32_t>(__cvta_generic_to_shared(&empty[0]));

  const TileCoord tile = raster_tile(int64_t{blockIdx.y} * gridDim.x + blockIdx.x, gridDim.x, gridDim.y, kRasterGroup);
  int64_t e, row0, rows;
  if (!find_tile<C::BM>(a, tile.m, e, row0, rows)) return;
  const int tid = threadIdx.x, wg = tid / 128;
  if (tid == 0) {
    for (int s = 0; s < C::STAGES; ++s) {
      mbar_init(full0 + 8 * s, 128 + 1);          // every producer thread's x pieces, and the TMA's arrival
      mbar_init(empty0 + 8 * s, C::CONSUMER_THREADS);  // every consumer thread, after its wgmma read the stage
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  hop::tile_pairs<C::BM>(a, row0, rows, pair_of, score_of);
  __syncthreads();  // barriers initialized, pair_of / score_of written

  const int KT = static_cast<int>((a.K + BK - 1) / BK);
  // One N tile per block (grid_y covers N; the loop of wgmma.cu is not needed at these sizes, and a
  // block that ran several would have to re-arm its barriers' phases).
  const int64_t n0 = tile.n * C::BN;
  if (wg == C::CONSUMERS) {
    // ---- producer ----
    setmaxnreg_dec<C::PRODUCER_REGS>();
    const int ptid = tid - C::CONSUMER_THREADS, piece = ptid % 8, prow = ptid / 8;
    const hop::XPieces<C::AP> xp(a, row0, rows, prow, C::ROW_STEP, piece);
    const int32_t wrow = static_cast<int32_t>(e * a.N + n0);  // first weight row of the tile in [E N, K]
    for (int j = 0; j < KT; ++j) {
      const int s = j % C::STAGES;
      mbar_wait(empty0 + 8 * s, ((j / C::STAGES) & 1) ^ 1);  // the consumers are done with this slot
      const uint32_t sa = ring + s * C::STAGE_BYTES, sb = sa + C::A_BYTES;
      if (ptid == 0) {
        mbar_arrive_expect_tx(full0 + 8 * s, C::B_BYTES);
        tma_load_2d(sb, &wmap, j * BK, wrow, full0 + 8 * s);
      }
      xp.copy(a, sa, prow, C::ROW_STEP, piece, int64_t{j} * BK);
      hop::cp_async_commit();
      if (j >= C::LAG) {  // stage j - LAG's pieces of this thread have landed
        hop::cp_async_wait<C::LAG>();
        hop::fence_async_smem();
        mbar_arrive(full0 + 8 * ((j - C::LAG) % C::STAGES));
      }
    }
    hop::cp_async_wait<0>();
    hop::fence_async_smem();
    for (int j = KT > C::LAG ? KT - C::LAG : 0; j < KT; ++j) mbar_arrive(full0 + 8 * (j % C::STAGES));
    return;  // everything it issued completes into barriers the consumers wait for
  }
  // ---- consumers ----
  setmaxnreg_inc<C::CONSUMER_REGS>();
  float acc[C::BN / 2];
#pragma unroll
  for (int i = 0; i < C::BN / 2; ++i) acc[i] = 0.0f;
  for (int j = 0; j < KT; ++j) {
    const int s = j % C::STAGES;
    mbar_wait(full0 + 8 * s, (j / C::STAGES) & 1);
    const uint32_t sa = ring + s * C::STAGE_BYTES + wg * 64 * kRowBytes, sb = ring + s * C::STAGE_BYTES + C::A_BYTES;
    const uint64_t da = smem_desc(sa), db = smem_desc(sb);
    hop::fence_operands(acc);
    hop::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) Wgmma<D, C::BN>::mma(acc, hop::desc_plus(da, kk * 32), hop::desc_plus(db, kk * 32));
    hop::wgmma_commit();
    hop::fence_operands(acc);
    hop::wgmma_wait<1>();  // stage j - 1's wgmmas are done: release it
    if (j > 0) mbar_arrive(empty0 + 8 * ((j - 1) % C::STAGES));
  }
  hop::wgmma_wait<0>();
  hop::fence_operands(acc);
  hop::epilogue<C::BM, C::BN, C::CONSUMER_THREADS, 1, /*BAR=*/1>(a, acc, reinterpret_cast<float*>(smem_raw + (ring - raw)),
                                                               pair_of, score_of, n0);
#else
  __trap();  // launched only where the device and the build have sm_90a (plan.h: CudaDevice::hopper)
#endif
}

// cuTensorMapEncodeTiled from the driver, found once through the runtime (no libcuda link).
using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
EncodeTiled encode_tiled() {
  static EncodeTiled fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      p = nullptr;
    return reinterpret_cast<EncodeTiled>(p);
  }();
  return fn;
}

}  // namespace

std::string launch_wgmma_ws(const MoeProblem& p, const GemmArgs& a, cudaStream_t stream) {
  using C = WsTile;
  const int64_t rows = p.E * p.N, n_tiles = (p.N + C::BN - 1) / C::BN;
  if (rows >= (int64_t{1} << 31) || p.K >= (int64_t{1} << 31) || n_tiles > 65535)
    return "internal: grouped_wgmma_ws_kernel: weights past the tensor map's 32-bit coordinates";
  const EncodeTiled encode = encode_tiled();
  if (encode == nullptr) return "grouped_wgmma_ws_kernel: the driver has no cuTensorMapEncodeTiled";
  // The weights as a [E N, K] matrix of 16-bit values: K contiguous, rows K * 2 bytes apart
  // (K % 8 == 0 and a 16-byte aligned base: the plan's Hopper conditions); boxes of 64 x 256,
  // zero-filled past either end.
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(p.K), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(p.K) * 2};
  const cuuint32_t box[2] = {BK, C::BN}, elem[2] = {1, 1};
  const CUresult r = encode(&map, p.x_dtype == DType::F16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                            2, const_cast<void*>(a.w), dims, strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) return "grouped_wgmma_ws_kernel: cuTensorMapEncodeTiled failed (" + std::to_string(r) + ")";
  const dim3 grid(static_cast<unsigned>(max_m_tiles(p, C::BM)), static_cast<unsigned>(n_tiles));
  auto kernel = p.x_dtype == DType::F16 ? grouped_wgmma_ws_kernel<DType::F16> : grouped_wgmma_ws_kernel<DType::BF16>;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
  if (err != cudaSuccess) return std::string("grouped_wgmma_ws_kernel shared memory: ") + cudaGetErrorString(err);
  kernel<<<grid, C::THREADS, C::SMEM, stream>>>(a, map);
  return launch_error("grouped_wgmma_ws_kernel");
}

}  // namespace jax_moe
