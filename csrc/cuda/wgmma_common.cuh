// What the Hopper grouped GEMMs (wgmma.cu for dense experts, wgmma_gguf.cu for GGUF experts)
// share: cp.async, the 128-byte swizzled K-major tile layout and its wgmma descriptors, and the
// epilogue through shared memory. Device code for sm_90a; callers guard the kernels' bodies with
// __CUDA_ARCH_FEAT_SM90_ALL.
#pragma once

#include <cstdint>

#include "grouped_gemm.cuh"

namespace jax_moe {
namespace hop {

constexpr int BK = 64;          // K elements per step: one 128-byte row of 16-bit values
constexpr int kRowBytes = 128;  // bytes of one tile row per step (the swizzle width)

// 16-byte asynchronous copy global -> shared; src_bytes < 16 reads that many and zero-fills the rest.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  cp_async16(dst, src, valid ? 16 : 0);
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Shared memory written by the threads (or cp.async) becomes visible to the tensor cores' reads.
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Keeps the compiler from touching the accumulators between a wgmma's issue and its wait (as
// CUTLASS's warpgroup_fence_operand): without it ptxas waits for each wgmma before the next.
template <int N>
__device__ __forceinline__ void fence_operands(float (&acc)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(acc[i])::"memory");
}

// Byte offset of 16-byte piece c of tile row r in the 128-byte swizzled layout: within each
// 1024-byte atom of 8 rows, piece c of row r sits at position c ^ r.
__device__ __forceinline__ uint32_t swizzled(int r, int c) { return r * kRowBytes + ((c ^ (r & 7)) << 4); }

// Matrix descriptor of a K-major operand in that layout: start address, leading byte offset
// (unused with swizzling, 1 by convention), stride byte offset 1024 (from one 8-row atom to the
// next), layout type 1 = 128-byte swizzle.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr) {
  return (uint64_t{(addr & 0x3FFFF) >> 4}) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) |
         (uint64_t{1} << 62);
}
// The descriptor of addr + bytes from addr's: the start address field (bits 0-13, addr / 16) takes
// the offset without a carry while the shared-memory address stays below 2^18 (Hopper's 228 KiB
// do), so one 64-bit add replaces rebuilding it (as CUTLASS's descriptor iterators do).
__device__ __forceinline__ uint64_t desc_plus(uint64_t desc, uint32_t bytes) { return desc + (bytes >> 4); }

// A thread's AP pieces of the gathered x tile (piece column `piece`, tile rows prow + i * row_step):
// each piece's source row (x itself where the tile row has no pair: always a valid address) and a
// bit per piece that has a pair, so that a K step's copies are an add, a mask and a cp.async each.
template <int AP>
struct XPieces {
  static_assert(AP <= 32, "one bit per piece");
  const uint16_t* src[AP];
  uint32_t live = 0;

  __device__ __forceinline__ XPieces(const GemmArgs& a, int64_t row0, int64_t rows, int prow, int row_step, int piece) {
    const auto* x = static_cast<const uint16_t*>(a.x);
#pragma unroll
    for (int i = 0; i < AP; ++i) {
      const int r = prow + i * row_step;
      const int64_t pair = r < rows ? a.perm[row0 + r] : -1;
      src[i] = pair < 0 ? x : x + (a.x_per_pair ? pair : pair / a.k) * a.K + piece * 8;
      live |= static_cast<uint32_t>(pair >= 0) << i;
    }
  }

  // The pieces of the K step starting at k0 into the swizzled A tile at shared address sa: 16 bytes
  // where the piece has a pair and lies inside K (K % 8 == 0: all in or all out), else zeros (read
  // from a valid address, none of its bytes).
  __device__ __forceinline__ void copy(const GemmArgs& a, uint32_t sa, int prow, int row_step, int piece,
                                       int64_t k0) const {
    const bool k_in = k0 + piece * 8 < a.K;
    const int64_t koff = k_in ? k0 : 0;
    const uint32_t live_k = k_in ? live : 0u;
    const uint32_t dst = sa + swizzled(prow, piece);  // tile rows prow + i row_step: the same swizzle (row_step % 8 == 0)
#pragma unroll
    for (int i = 0; i < AP; ++i)
      cp_async16(dst + i * row_step * kRowBytes, src[i] + koff, static_cast<int>((live_k >> i) & 1u) * 16);
  }
};

// The tile's pairs and their scores, for the epilogue (rows past `rows` get pair -1).
template <int BM>
__device__ __forceinline__ void tile_pairs(const GemmArgs& a, int64_t row0, int64_t rows, int64_t* pair_of,
                                           float* score_of) {
  for (int r = threadIdx.x; r < BM; r += blockDim.x) {
    pair_of[r] = r < rows ? a.perm[row0 + r] : -1;
    score_of[r] = pair_of[r] < 0 ? 0.0f : load_as_float(a.scores, pair_of[r], a.score_dtype);
  }
}

// Epilogue of a BM x BN tile whose accumulators are split over the first BM / (64 MI) warpgroups,
// MI m64nBN blocks each (warpgroup w's block m holds tile rows 64 (w MI + m) ..; further
// warpgroups hold none): through shared memory `stage` (BM x (BN + 8) floats, idle ring space) so
// that each warp then writes whole rows with 16-byte stores. Register i of a block holds row
// 16 * warp + lane / 4 + 8 * ((i / 2) % 2) of its 64, column 8 * (i / 4) + 2 * (lane % 4) + i % 2.
// Starts and ends with a barrier.
// BAR = 0: the block's barrier; else named barrier BAR over the first THREADS threads (a
// warp-specialized kernel whose producer does not take part).
template <int BAR, int THREADS>
__device__ __forceinline__ void tile_sync() {
  if constexpr (BAR == 0) __syncthreads();
  else asm volatile("bar.sync %0, %1;\n" ::"n"(BAR), "n"(THREADS) : "memory");
}

template <int BM, int BN, int THREADS, int MI, int BAR = 0>
__device__ __forceinline__ void epilogue(const GemmArgs& a, const float (&acc)[MI][BN / 2], float* stage,
                                         const int64_t* pair_of, const float* score_of, int64_t n0) {
  constexpr int LD = BN + 8;
  const int tid = threadIdx.x, wgi = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
  tile_sync<BAR, THREADS>();  // every warpgroup's tensor cores are done reading the ring
#pragma unroll
  for (int m = 0; m < MI; ++m) {
    const int r0 = (wgi * MI + m) * 64 + warp * 16 + lane / 4;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      if (wgi * MI >= BM / 64) break;
      const int c = j * 8 + 2 * (lane % 4);
      *reinterpret_cast<float2*>(stage + r0 * LD + c) = make_float2(acc[m][4 * j], acc[m][4 * j + 1]);
      *reinterpret_cast<float2*>(stage + (r0 + 8) * LD + c) = make_float2(acc[m][4 * j + 2], acc[m][4 * j + 3]);
    }
  }
  tile_sync<BAR, THREADS>();
  constexpr int PER_ROW = BN / 8;  // threads per row, 8 columns each
#pragma unroll 1
  for (int i = tid; i < BM * PER_ROW; i += THREADS) {
    const int r = i / PER_ROW, c = (i % PER_ROW) * 8;
    store_row8(a, pair_of[r], score_of[r], n0 + c, stage + r * LD + c);
  }
  tile_sync<BAR, THREADS>();  // the staging area is free again
}

// One m64nBN block per warpgroup.
template <int BM, int BN, int THREADS, int MI = 1, int BAR = 0>
__device__ __forceinline__ void epilogue(const GemmArgs& a, const float (&acc)[BN / 2], float* stage,
                                         const int64_t* pair_of, const float* score_of, int64_t n0) {
  epilogue<BM, BN, THREADS, 1, BAR>(a, reinterpret_cast<const float(&)[1][BN / 2]>(acc), stage, pair_of, score_of, n0);
}

}  // namespace hop
}  // namespace jax_moe
