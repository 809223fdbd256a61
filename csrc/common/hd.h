// Host/device qualifiers shared by code compiled by both the C++ and the CUDA compiler.
#pragma once

#if defined(__CUDACC__)
#define JM_HD __host__ __device__ __forceinline__
#define JM_DEVICE __device__ __forceinline__
#else
#define JM_HD inline
#define JM_DEVICE inline
#endif

namespace jax_moe {

// f32 multiply and subtract that the compiler never fuses into an FMA, so that decoding is
// bit-exact with ggml's formulas on the host and on the device alike.
JM_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

JM_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

}  // namespace jax_moe
