// The one view of every GGUF format that the codecs and all kernels share.
//
// Each format is described by a traits struct `Format<T>`:
//   Block            the block struct (gguf_blocks.h)
//   QK, SUB          elements per block and per sub-block (the span of one scale)
//   HAS_MIN          whether sub-blocks carry a min
//   quant(b, i)      the integer quant of element i (signed; offsets already applied)
//   scale_min(b, s, a, m)  the f32 scale a and min m of sub-block s
// and element i decodes to  a * quant(b, i) - m  with a and m of sub-block i / SUB, computed
// with unfused f32 operations. That expression is ggml's dequantization for each format, so
// decoding is bit-exact with ggml and with gguf.quants; the integer dot products of SCALAR_GGUF
// use the same quants and scales.
#pragma once

#include <cstdint>

#include "fp16.h"
#include "gguf_blocks.h"
#include "hd.h"

namespace jax_moe {

template <GGMLType T>
struct Format;

// Unpack the 6-bit scale and min of sub-block j of a Q4_K / Q5_K super-block.
JM_HD void k4_scale_min(const uint8_t* q, int j, int& sc, int& mn) {
  if (j < 4) {
    sc = q[j] & 63;
    mn = q[j + 4] & 63;
  } else {
    sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Unpack the signed 6-bit scale of sub-block j (0..15) of a Q3_K super-block.
JM_HD int q3k_scale(const uint8_t* s, int j) {
  const int low = j < 8 ? (s[j] & 0xF) : (s[j - 8] >> 4);
  const int high = (s[8 + (j & 3)] >> (2 * (j >> 2))) & 3;
  return (low | (high << 4)) - 32;
}

template <>
struct Format<GGMLType::Q8_0> {
  using Block = block_q8_0;
  static constexpr GGMLType type = GGMLType::Q8_0;
  static constexpr int QK = QK8_0, SUB = 32;
  static constexpr bool HAS_MIN = false;
  static JM_HD int quant(const Block& b, int i) { return b.qs[i]; }
  static JM_HD void scale_min(const Block& b, int, float& a, float& m) {
    a = half_to_float(b.d);
    m = 0.0f;
  }
};

template <>
struct Format<GGMLType::Q2_K> {
  using Block = block_q2_K;
  static constexpr GGMLType type = GGMLType::Q2_K;
  static constexpr int QK = QK_K, SUB = 16;
  static constexpr bool HAS_MIN = true;
  static JM_HD int quant(const Block& b, int i) {
    const int n = i >> 7, j = (i >> 5) & 3, l = i & 31;
    return (b.qs[32 * n + l] >> (2 * j)) & 3;
  }
  static JM_HD void scale_min(const Block& b, int s, float& a, float& m) {
    a = mul_rn(half_to_float(b.d), static_cast<float>(b.scales[s] & 0xF));
    m = mul_rn(half_to_float(b.dmin), static_cast<float>(b.scales[s] >> 4));
  }
};

template <>
struct Format<GGMLType::Q3_K> {
  using Block = block_q3_K;
  static constexpr GGMLType type = GGMLType::Q3_K;
  static constexpr int QK = QK_K, SUB = 16;
  static constexpr bool HAS_MIN = false;
  static JM_HD int quant(const Block& b, int i) {
    const int n = i >> 7, j = (i >> 5) & 3, l = i & 31;
    const int low = (b.qs[32 * n + l] >> (2 * j)) & 3;
    const bool high = (b.hmask[l] >> (4 * n + j)) & 1;
    return low - (high ? 0 : 4);
  }
  static JM_HD void scale_min(const Block& b, int s, float& a, float& m) {
    a = mul_rn(half_to_float(b.d), static_cast<float>(q3k_scale(b.scales, s)));
    m = 0.0f;
  }
};

template <>
struct Format<GGMLType::Q4_K> {
  using Block = block_q4_K;
  static constexpr GGMLType type = GGMLType::Q4_K;
  static constexpr int QK = QK_K, SUB = 32;
  static constexpr bool HAS_MIN = true;
  static JM_HD int quant(const Block& b, int i) {
    const int c = i >> 6, l = i & 63;
    return l < 32 ? (b.qs[32 * c + l] & 0xF) : (b.qs[32 * c + l - 32] >> 4);
  }
  static JM_HD void scale_min(const Block& b, int s, float& a, float& m) {
    int sc, mn;
    k4_scale_min(b.scales, s, sc, mn);
    a = mul_rn(half_to_float(b.d), static_cast<float>(sc));
    m = mul_rn(half_to_float(b.dmin), static_cast<float>(mn));
  }
};

template <>
struct Format<GGMLType::Q5_K> {
  using Block = block_q5_K;
  static constexpr GGMLType type = GGMLType::Q5_K;
  static constexpr int QK = QK_K, SUB = 32;
  static constexpr bool HAS_MIN = true;
  static JM_HD int quant(const Block& b, int i) {
    const int c = i >> 6, l = i & 63, hi = l >= 32, ll = l & 31;
    const int low = hi ? (b.qs[32 * c + ll] >> 4) : (b.qs[32 * c + ll] & 0xF);
    return low + (((b.qh[ll] >> (2 * c + hi)) & 1) << 4);
  }
  static JM_HD void scale_min(const Block& b, int s, float& a, float& m) {
    int sc, mn;
    k4_scale_min(b.scales, s, sc, mn);
    a = mul_rn(half_to_float(b.d), static_cast<float>(sc));
    m = mul_rn(half_to_float(b.dmin), static_cast<float>(mn));
  }
};

template <>
struct Format<GGMLType::Q6_K> {
  using Block = block_q6_K;
  static constexpr GGMLType type = GGMLType::Q6_K;
  static constexpr int QK = QK_K, SUB = 16;
  static constexpr bool HAS_MIN = false;
  static JM_HD int quant(const Block& b, int i) {
    const int n = i >> 7, quarter = (i >> 5) & 3, l = i & 31;
    const uint8_t lo_byte = b.ql[64 * n + l + ((quarter & 1) ? 32 : 0)];
    const int low = (quarter & 2) ? (lo_byte >> 4) : (lo_byte & 0xF);
    const int high = (b.qh[32 * n + l] >> (2 * quarter)) & 3;
    return (low | (high << 4)) - 32;
  }
  static JM_HD void scale_min(const Block& b, int s, float& a, float& m) {
    a = mul_rn(half_to_float(b.d), static_cast<float>(b.scales[s]));
    m = 0.0f;
  }
};

// Decode element i of a block given its sub-block's scale and min (ggml's formula).
template <class F>
JM_HD float decode_value(const typename F::Block& b, int i, float a, float m) {
  const float v = mul_rn(a, static_cast<float>(F::quant(b, i)));
  return F::HAS_MIN ? sub_rn(v, m) : v;
}

// Decode one whole block into QK floats.
template <class F>
JM_HD void decode_block(const typename F::Block& b, float* out) {
  for (int s = 0; s < F::QK / F::SUB; ++s) {
    float a, m;
    F::scale_min(b, s, a, m);
    for (int i = s * F::SUB; i < (s + 1) * F::SUB; ++i) out[i] = decode_value<F>(b, i, a, m);
  }
}

// Call `fn(Format<T>{})` for the runtime type `t`; returns false for unsupported types.
template <class Fn>
inline bool dispatch_format(GGMLType t, Fn&& fn) {
  switch (t) {
    case GGMLType::Q8_0: fn(Format<GGMLType::Q8_0>{}); return true;
    case GGMLType::Q2_K: fn(Format<GGMLType::Q2_K>{}); return true;
    case GGMLType::Q3_K: fn(Format<GGMLType::Q3_K>{}); return true;
    case GGMLType::Q4_K: fn(Format<GGMLType::Q4_K>{}); return true;
    case GGMLType::Q5_K: fn(Format<GGMLType::Q5_K>{}); return true;
    case GGMLType::Q6_K: fn(Format<GGMLType::Q6_K>{}); return true;
    default: return false;
  }
}

}  // namespace jax_moe
