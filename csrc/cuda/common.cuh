// Small CUDA helpers shared by the kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "../common/fp16.h"

namespace jax_moe {

// Grid dimensions y and z are limited to 65535; kernels loop over the rest.
constexpr unsigned kMaxGridY = 65535;

inline unsigned grid_y(int64_t n) { return static_cast<unsigned>(n < kMaxGridY ? (n > 0 ? n : 1) : kMaxGridY); }

// Empty string when the last launch succeeded, else "<what>: <CUDA error string>".
inline std::string launch_error(const char* what) {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(what) + ": " + cudaGetErrorString(err);
}

// The current device's multiprocessor count into sms: empty, or the failed query's error (cleared).
inline std::string multiprocessor_count(int& sms) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) return {};
  cudaGetLastError();
  return std::string("multiprocessor count: ") + cudaGetErrorString(err);
}

// Device element types of the activation dtypes.
template <DType D>
struct DevType;
template <>
struct DevType<DType::F16> {
  using type = __half;
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};
template <>
struct DevType<DType::BF16> {
  using type = __nv_bfloat16;
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

// Sum over a warp in a fixed butterfly order (the same result on every run).
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ bool valid_expert(int32_t e, int64_t E) { return e >= 0 && e < E; }

}  // namespace jax_moe
