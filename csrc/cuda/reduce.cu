// Epilogues over pairs: the deterministic reduction over k, and zeroing the rows of invalid pairs.
#include "common.cuh"
#include "kernels.h"

namespace jax_moe {
namespace {

// out[t, n] = sum over j = 0..k-1 (in that order) of partial[t*k + j, n] for valid pairs.
__global__ void reduce_pairs_kernel(const float* partial, const int32_t* ids, int64_t T, int64_t k,
                                    int64_t N, int64_t E, void* out, DType out_dtype) {
  const int64_t total = T * N;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = i / N, n = i % N;
    float sum = 0.0f;
    for (int64_t j = 0; j < k; ++j)
      if (valid_expert(ids[t * k + j], E)) sum += partial[(t * k + j) * N + n];
    store_from_float(out, i, out_dtype, sum);
  }
}

// Rows of pairs whose expert id is out of range are exactly zero (no reduce).
__global__ void zero_invalid_pairs_kernel(const int32_t* ids, int64_t pairs, int64_t N, int64_t E,
                                          void* out, DType out_dtype) {
  for (int64_t p = blockIdx.x; p < pairs; p += gridDim.x) {
    if (valid_expert(ids[p], E)) continue;
    for (int64_t n = threadIdx.x; n < N; n += blockDim.x) store_from_float(out, p * N + n, out_dtype, 0.0f);
  }
}

unsigned blocks(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<unsigned>(b < (1 << 20) ? (b > 0 ? b : 1) : (1 << 20));
}

}  // namespace

std::string launch_reduce_pairs(const MoeProblem& p, const MoeBuffers& b, const float* partial,
                                cudaStream_t stream) {
  if (p.T * p.N == 0) return {};
  reduce_pairs_kernel<<<blocks(p.T * p.N, 256), 256, 0, stream>>>(partial, b.ids, p.T, p.k, p.N, p.E,
                                                                    b.out, p.out_dtype);
  return launch_error("reduce_pairs_kernel");
}

std::string launch_zero_invalid_pairs(const MoeProblem& p, const MoeBuffers& b, cudaStream_t stream) {
  if (p.pairs() * p.N == 0) return {};
  const int64_t grid = std::min<int64_t>(p.pairs(), 1 << 20);
  zero_invalid_pairs_kernel<<<static_cast<unsigned>(grid), 128, 0, stream>>>(b.ids, p.pairs(), p.N, p.E,
                                                                            b.out, p.out_dtype);
  return launch_error("zero_invalid_pairs_kernel");
}

}  // namespace jax_moe
