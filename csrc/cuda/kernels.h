// Host entry points of the CUDA kernels, one per file of csrc/cuda/. Each returns an empty
// string on success or the launch error. All work goes to `stream`; nothing allocates,
// synchronizes or reads device memory on the host (CUDA-graph safe).
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "../common/moe_problem.h"
#include "scratch.h"

namespace jax_moe {

// grouping.cu: sort valid pairs by expert (counts, offsets, GEMM tile starts, permutation).
std::string group_pairs_by_expert(const MoeProblem& p, const int32_t* ids, uint8_t* scratch,
                                  const ScratchLayout& s, int tile_m, cudaStream_t stream);

// scalar_gguf.cu: SCALAR_GGUF, q8_1 staging then integer dot products.
std::string launch_scalar_gguf(const MoeProblem& p, const MoeBuffers& b, uint8_t* scratch,
                               const ScratchLayout& s, cudaStream_t stream);

// small_t.cu: WMMA and WMMA_GGUF through the token GEMV kernel, for few tokens per expert
// (hopper: wgmma_device(), whose GEMM takes over at fewer pairs per expert).
bool use_token_gemv(const MoeProblem& p, bool hopper);
std::string launch_small_t(const MoeProblem& p, const MoeBuffers& b, cudaStream_t stream);

// wgmma.cu: the build has sm_90a code and the current device is compute capability 9.0.
bool wgmma_device();

// wmma.cu: WMMA and WMMA_GGUF grouped tensor-core GEMM (through wgmma.cu when hopper, that is
// wgmma_device(), and the problem allows).
std::string launch_wmma(const MoeProblem& p, const MoeBuffers& b, uint8_t* scratch,
                        const ScratchLayout& s, bool hopper, cudaStream_t stream);

// reduce.cu: out[t] = sum_j partial[t, j] in order j; zero rows of invalid pairs.
std::string launch_reduce_pairs(const MoeProblem& p, const MoeBuffers& b, const float* partial,
                                cudaStream_t stream);
std::string launch_zero_invalid_pairs(const MoeProblem& p, const MoeBuffers& b, cudaStream_t stream);

// The whole forward of one validated call.
std::string moe_forward_cuda(const MoeProblem& p, const MoeBuffers& b, uint8_t* scratch,
                             size_t scratch_bytes, cudaStream_t stream);

}  // namespace jax_moe
