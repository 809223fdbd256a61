// Grouping routed pairs by expert on the device: a counting sort whose counts, offsets, GEMM
// tile starts and permutation live in the scratch buffer (no host reads of device data).
#include <cub/block/block_scan.cuh>

#include "common.cuh"
#include "kernels.h"

namespace jax_moe {
namespace {

__global__ void histogram_kernel(const int32_t* ids, int64_t pairs, int64_t E, int32_t* counts) {
  for (int64_t p = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; p < pairs;
       p += int64_t{gridDim.x} * blockDim.x) {
    const int32_t e = ids[p];
    if (valid_expert(e, E)) atomicAdd(&counts[e], 1);
  }
}

constexpr int kScanThreads = 1024;

// One block: offsets = exclusive prefix of counts, tile_start = prefix of ceil(count / tile_m),
// cursor = offsets. Loops over E in chunks, carrying the running sums.
__global__ void __launch_bounds__(kScanThreads) scan_kernel(const int32_t* counts, int64_t E, int tile_m,
                                                          int32_t* offsets, int32_t* tile_start,
                                                          int32_t* cursor) {
  using Scan = cub::BlockScan<int2, kScanThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int2 carry;
  if (threadIdx.x == 0) carry = make_int2(0, 0);
  __syncthreads();
  for (int64_t base = 0; base < E; base += kScanThreads) {
    const int64_t e = base + threadIdx.x;
    const int c = e < E ? counts[e] : 0;
    const int2 v = make_int2(c, (c + tile_m - 1) / tile_m);
    int2 excl, total;
    Scan(tmp).ExclusiveScan(v, excl, make_int2(0, 0),
                            [](int2 a, int2 b) { return make_int2(a.x + b.x, a.y + b.y); }, total);
    const int2 c0 = carry;
    if (e < E) {
      offsets[e] = c0.x + excl.x;
      cursor[e] = c0.x + excl.x;
      tile_start[e] = c0.y + excl.y;
    }
    __syncthreads();  // everyone has read `carry` and `tmp` before they are rewritten
    if (threadIdx.x == 0) carry = make_int2(c0.x + total.x, c0.y + total.y);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    offsets[E] = carry.x;
    tile_start[E] = carry.y;
  }
}

__global__ void scatter_kernel(const int32_t* ids, int64_t pairs, int64_t E, int32_t* cursor, int32_t* perm) {
  for (int64_t p = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; p < pairs;
       p += int64_t{gridDim.x} * blockDim.x) {
    const int32_t e = ids[p];
    if (valid_expert(e, E)) perm[atomicAdd(&cursor[e], 1)] = static_cast<int32_t>(p);
  }
}

unsigned blocks_for(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<unsigned>(b < 65536 ? (b > 0 ? b : 1) : 65536);
}

}  // namespace

std::string group_pairs_by_expert(const MoeProblem& p, const int32_t* ids, uint8_t* scratch,
                                  const ScratchLayout& s, int tile_m, cudaStream_t stream) {
  auto* counts = reinterpret_cast<int32_t*>(scratch + s.counts);
  auto* offsets = reinterpret_cast<int32_t*>(scratch + s.offsets);
  auto* tile_start = reinterpret_cast<int32_t*>(scratch + s.tile_start);
  auto* cursor = reinterpret_cast<int32_t*>(scratch + s.cursor);
  auto* perm = reinterpret_cast<int32_t*>(scratch + s.perm);
  const int64_t pairs = p.pairs();
  if (p.E > 0) {
    const cudaError_t err = cudaMemsetAsync(counts, 0, sizeof(int32_t) * static_cast<size_t>(p.E), stream);
    if (err != cudaSuccess) return std::string("clearing expert counts: ") + cudaGetErrorString(err);
  }
  if (pairs > 0) {
    histogram_kernel<<<blocks_for(pairs, 256), 256, 0, stream>>>(ids, pairs, p.E, counts);
    if (auto e = launch_error("histogram_kernel"); !e.empty()) return e;
  }
  scan_kernel<<<1, kScanThreads, 0, stream>>>(counts, p.E, tile_m, offsets, tile_start, cursor);
  if (auto e = launch_error("scan_kernel"); !e.empty()) return e;
  if (pairs > 0) {
    scatter_kernel<<<blocks_for(pairs, 256), 256, 0, stream>>>(ids, pairs, p.E, cursor, perm);
    if (auto e = launch_error("scatter_kernel"); !e.empty()) return e;
  }
  return {};
}

}  // namespace jax_moe
