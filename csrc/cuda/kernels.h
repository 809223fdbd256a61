// Host entry points of the CUDA kernels, one per file of csrc/cuda/. Each returns an empty
// string on success or the launch error. All work goes to `stream`; nothing allocates,
// synchronizes or reads device memory on the host (CUDA-graph safe).
#pragma once

#include <cuda_runtime.h>

#include <string>
#include <utility>

#include "../common/moe_problem.h"
#include "plan.h"
#include "scratch.h"

namespace jax_moe {

// grouping.cu: sort valid pairs by expert (counts, offsets, GEMM tile starts, permutation).
std::string group_pairs_by_expert(const MoeProblem& p, const int32_t* ids, uint8_t* scratch,
                                  const ScratchLayout& s, int tile_m, cudaStream_t stream);

// scalar_gguf.cu: SCALAR_GGUF, q8_1 staging then integer dot products.
std::string launch_scalar_gguf(const MoeProblem& p, const MoeBuffers& b, uint8_t* scratch,
                               const ScratchLayout& s, cudaStream_t stream);

// small_t.cu: WMMA and WMMA_GGUF through the token GEMV kernel, for few tokens per expert (where
// the plan says so).
std::string launch_small_t(const MoeProblem& p, const MoeBuffers& b, cudaStream_t stream);

// mma_gguf.cu: WMMA_GGUF through the tensor-core GEMV (mma_gemv.cuh), where the plan says so.
std::string launch_mma_gguf(const MoeProblem& p, const MoeBuffers& b, cudaStream_t stream);

// forward.cu: what the current device and this build allow; whether x and w allow 16-byte pieces.
CudaDevice current_device();
bool aligned16(const MoeBuffers& b);

// reduce.cu: out[t] = sum_j partial[t, j] in order j; zero rows of invalid pairs.
std::string launch_reduce_pairs(const MoeProblem& p, const MoeBuffers& b, const float* partial,
                                cudaStream_t stream);
std::string launch_zero_invalid_pairs(const MoeProblem& p, const MoeBuffers& b, cudaStream_t stream);

// What the CUDA forward of a call reports across the launch boundary: success, an argument the
// call cannot run with (INVALID_ARGUMENT: its scratch buffer is smaller than the plan needs), or a
// failed launch (INTERNAL, with CUDA's error string). The launchers below it return "" or the
// error of a launch, which is always internal.
struct CudaStatus {
  enum class Code { kOk, kInvalidArgument, kInternal };
  Code code = Code::kOk;
  std::string message;
  static CudaStatus invalid_argument(std::string m) { return {Code::kInvalidArgument, std::move(m)}; }
  static CudaStatus launched(std::string error) {
    return error.empty() ? CudaStatus{} : CudaStatus{Code::kInternal, std::move(error)};
  }
};

// The whole forward of one validated call on device `dev` (current_device()).
CudaStatus moe_forward_cuda(const MoeProblem& p, const MoeBuffers& b, const CudaDevice& dev, uint8_t* scratch,
                            size_t scratch_bytes, cudaStream_t stream);

}  // namespace jax_moe
