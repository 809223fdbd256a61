// IEEE half and bfloat16 conversions on raw bits, identical on the host and the device.
//
// Host code cannot rely on compiler support for _Float16 / __bf16, so the conversions are
// written on bit patterns: round-to-nearest-even, NaN kept NaN, overflow to infinity.
#pragma once

#include <cstdint>
#include <cstring>

#include "moe_types.h"

#include "hd.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace jax_moe {

JM_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

JM_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// IEEE binary16 bits -> f32 (exact).
JM_HD float half_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp != 0) return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
  if (man == 0) return bits_f32(sign);
  // Subnormal half: value = man * 2^-24, exactly representable in f32.
  const float v = static_cast<float>(man) * 5.9604644775390625e-08f;
  return sign ? -v : v;
#endif
}

// f32 -> IEEE binary16 bits, round to nearest even.
JM_HD uint16_t float_to_half(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  const uint32_t x = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));  // nan
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (ax >= 0x38800000u) {  // normal half range (>= 2^-14)
    const uint32_t mant_round = ax + 0xfffu + ((ax >> 13) & 1u);
    return static_cast<uint16_t>(sign | ((mant_round - 0x38000000u) >> 13));
  }
  // Subnormal half or zero: value / 2^-24 rounded to nearest even integer.
  if (ax < 0x33000000u) return sign;  // < 2^-25: rounds to zero
  const uint32_t e = ax >> 23;
  const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - e;  // 14 - (e - 127) + 13 - 1 ... bring to units of 2^-24
  // value = m * 2^(e-150); units of 2^-24 -> m * 2^(e-126) = m >> (126 - e)
  const uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  uint32_t r = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
  return static_cast<uint16_t>(sign | r);
#endif
}

// bfloat16 bits -> f32 (exact).
JM_HD float bf16_to_float(uint16_t b) { return bits_f32(static_cast<uint32_t>(b) << 16); }

// f32 -> bfloat16 bits, round to nearest even; NaN stays a quiet NaN.
JM_HD uint16_t float_to_bf16(float f) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  const uint32_t x = f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
#endif
}

// The element types the kernels see. Values are ours (not XLA's); the FFI layer maps them.
JM_HD float load_as_float(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::F16: return half_to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::BF16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

JM_HD void store_from_float(void* p, int64_t i, DType t, float v) {
  switch (t) {
    case DType::F16: static_cast<uint16_t*>(p)[i] = float_to_half(v); break;
    case DType::BF16: static_cast<uint16_t*>(p)[i] = float_to_bf16(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

// Round an f32 to the precision of `t` and return it as f32 (identity for F32).
JM_HD float round_to(DType t, float v) {
  switch (t) {
    case DType::F16: return half_to_float(float_to_half(v));
    case DType::BF16: return bf16_to_float(float_to_bf16(v));
    default: return v;
  }
}

}  // namespace jax_moe
