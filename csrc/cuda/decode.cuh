// GGUF decoding on the device, rounded to the activation dtype: 8 values per call, bit-exact with
// decode8 then round_to (gguf_formats.h, fp16.h), with cheaper instructions. On Hopper the
// conversion instructions (int -> f32, f32 -> f16/bf16) issue at 1/8 of the f32 rate, and they
// dominated the small-T GGUF kernels; here a quant becomes a float through a byte permute and
// one exact subtraction, and the rounding converts two values per instruction.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../common/gguf_formats.h"

namespace jax_moe {

// Two f32 rounded (nearest even) to the activation dtype, packed: a in the low half.
template <DType D>
__device__ __forceinline__ uint32_t round2(float a, float b) {
  if constexpr (D == DType::BF16) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

// Eight packed int8 quants q (F::quant8 of elements i0 .. i0+7 of one sub-block, scale a, min m)
// decoded and rounded once to D, as 8 packed 16-bit values: a * q - m of ggml's formulas. For the
// formats with mins (Q2_K, Q4_K, Q5_K) a * q is exact in f32 (a = d * sc has at most 11 + 6
// significant bits, q at most 5), so fma(a, q, -m) rounds a * q - m once, exactly as the unfused
// f32 expression of the CPU codec does.
template <class F, DType D>
__device__ __forceinline__ uint4 decode_quants8(uint64_t q, float a, float m) {
  // Bias each signed byte by 128 (flip its top bit); 0x4B0000bb is then the float 2^23 + q + 128.
  const uint32_t lo = static_cast<uint32_t>(q) ^ 0x80808080u, hi = static_cast<uint32_t>(q >> 32) ^ 0x80808080u;
  float v[8];
#pragma unroll
  for (int t = 0; t < 8; ++t) {
    const uint32_t bits = __byte_perm(t < 4 ? lo : hi, 0x4B000000u, 0x7540u | (t & 3));
    const float qf = __fsub_rn(__uint_as_float(bits), 8388736.0f);  // exact: q
    v[t] = F::HAS_MIN ? __fmaf_rn(a, qf, -m) : __fmul_rn(a, qf);
  }
  return make_uint4(round2<D>(v[0], v[1]), round2<D>(v[2], v[3]), round2<D>(v[4], v[5]), round2<D>(v[6], v[7]));
}

// Eight MXFP4 values for bf16 activations: e2m1_bf16x8's pairs (E2M1 x 2^-126) times the block's
// mxfp4_bf16_scale factors, each product the ggml value kvalue x e8m0_half(e) rounded once to bf16
// (gguf_formats.h; tests/cpp mxfp4_bf16): s1 alone where e <= 128, s1 then s2 where TWO.
__device__ __forceinline__ uint32_t mul_bf16x2(uint32_t a, uint32_t b) {
  const __nv_bfloat162 r =
      __hmul2_rn(*reinterpret_cast<const __nv_bfloat162*>(&a), *reinterpret_cast<const __nv_bfloat162*>(&b));
  return *reinterpret_cast<const uint32_t*>(&r);
}
template <bool TWO>
__device__ __forceinline__ uint4 mxfp4_bf16_scaled(Bf16x2x4 v, Mxfp4Bf16Scale s) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v.v[i] = mul_bf16x2(v.v[i], s.s1);
    if constexpr (TWO) v.v[i] = mul_bf16x2(v.v[i], s.s2);  // s2 = 1 where e <= 128
  }
  return make_uint4(v.v[0], v.v[1], v.v[2], v.v[3]);
}

// Elements i0 .. i0+7 (i0 % 8 == 0, inside one sub-block with scale a and min m) of block b,
// decoded and rounded once to D.
template <class F, DType D>
__device__ __forceinline__ uint4 decode8_rounded(const typename F::Block& b, int i0, float a, float m) {
  return decode_quants8<F, D>(F::quant8(b, i0), a, m);
}

}  // namespace jax_moe
