// The one view of every GGUF format that the codecs and all kernels share.
//
// Each format is described by a traits struct `Format<T>`:
//   Block            the block struct (gguf_blocks.h)
//   QK, SUB          elements per block and per sub-block (the span of one scale)
//   HAS_MIN          whether sub-blocks carry a min
//   quant8(b, i0, q) the integer quants (signed; offsets applied) of elements i0 .. i0+7
//                    (i0 % 8 == 0), read with loads as wide as the layout allows (blocks start
//                    at multiples of their size in 16-byte-aligned rows)
//   scale_min(b, s, a, m)  the f32 scale a and min m of sub-block s
// and element i decodes to  a * q_i - m  with a and m of sub-block i / SUB, computed
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

// Eight bytes starting at p as a little-endian uint64, read with loads as wide as the alignment
// ALIGN (bytes) that the format's layout guarantees for p.
template <int ALIGN>
JM_HD uint64_t load8(const uint8_t* p) {
  if constexpr (ALIGN >= 8) {
    return *reinterpret_cast<const uint64_t*>(p);
  } else if constexpr (ALIGN >= 4) {
    const auto* w = reinterpret_cast<const uint32_t*>(p);
    return static_cast<uint64_t>(w[0]) | (static_cast<uint64_t>(w[1]) << 32);
  } else if constexpr (ALIGN >= 2) {
    const auto* h = reinterpret_cast<const uint16_t*>(p);
    return static_cast<uint64_t>(h[0]) | (static_cast<uint64_t>(h[1]) << 16) |
           (static_cast<uint64_t>(h[2]) << 32) | (static_cast<uint64_t>(h[3]) << 48);
  } else {
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
    return v;
  }
}

JM_HD int byte_of(uint64_t v, int j) { return static_cast<int>((v >> (8 * j)) & 0xff); }

template <>
struct Format<GGMLType::Q8_0> {
  using Block = block_q8_0;
  static constexpr GGMLType type = GGMLType::Q8_0;
  static constexpr int QK = QK8_0, SUB = 32;
  static constexpr bool HAS_MIN = false;
  static JM_HD void quant8(const Block& b, int i0, int* q) {
    const uint64_t v = load8<2>(reinterpret_cast<const uint8_t*>(b.qs) + i0);
    for (int j = 0; j < 8; ++j) q[j] = static_cast<int8_t>(byte_of(v, j));
  }
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
  static JM_HD void quant8(const Block& b, int i0, int* q) {
    const int n = i0 >> 7, j = (i0 >> 5) & 3, l = i0 & 31;
    const uint64_t v = load8<4>(b.qs + 32 * n + l);
    for (int t = 0; t < 8; ++t) q[t] = (byte_of(v, t) >> (2 * j)) & 3;
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
  static JM_HD void quant8(const Block& b, int i0, int* q) {
    const int n = i0 >> 7, j = (i0 >> 5) & 3, l = i0 & 31;
    const uint64_t lo = load8<2>(b.qs + 32 * n + l), hm = load8<2>(b.hmask + l);
    for (int t = 0; t < 8; ++t)
      q[t] = ((byte_of(lo, t) >> (2 * j)) & 3) - (((byte_of(hm, t) >> (4 * n + j)) & 1) ? 0 : 4);
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
  static JM_HD void quant8(const Block& b, int i0, int* q) {
    const int c = i0 >> 6, l = i0 & 63;
    const uint64_t v = load8<8>(b.qs + 32 * c + (l & 31));
    const int shift = l >= 32 ? 4 : 0;
    for (int t = 0; t < 8; ++t) q[t] = (byte_of(v, t) >> shift) & 0xF;
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
  static JM_HD void quant8(const Block& b, int i0, int* q) {
    const int c = i0 >> 6, l = i0 & 63, hi = l >= 32, ll = l & 31;
    const uint64_t lo = load8<8>(b.qs + 32 * c + ll), h = load8<8>(b.qh + ll);
    for (int t = 0; t < 8; ++t)
      q[t] = ((byte_of(lo, t) >> (hi ? 4 : 0)) & 0xF) + (((byte_of(h, t) >> (2 * c + hi)) & 1) << 4);
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
  static JM_HD void quant8(const Block& b, int i0, int* q) {
    const int n = i0 >> 7, quarter = (i0 >> 5) & 3, l = i0 & 31;
    const uint64_t lo = load8<2>(b.ql + 64 * n + l + ((quarter & 1) ? 32 : 0));
    const uint64_t hq = load8<2>(b.qh + 32 * n + l);
    for (int t = 0; t < 8; ++t)
      q[t] = (((byte_of(lo, t) >> ((quarter & 2) ? 4 : 0)) & 0xF) | (((byte_of(hq, t) >> (2 * quarter)) & 3) << 4)) - 32;
  }
  static JM_HD void scale_min(const Block& b, int s, float& a, float& m) {
    a = mul_rn(half_to_float(b.d), static_cast<float>(b.scales[s]));
    m = 0.0f;
  }
};

// Decode elements i0 .. i0+7 (one aligned group inside one sub-block) given that sub-block's
// scale and min: ggml's formula, unfused f32.
template <class F>
JM_HD void decode8(const typename F::Block& b, int i0, float a, float m, float* out) {
  int q[8];
  F::quant8(b, i0, q);
  for (int t = 0; t < 8; ++t) {
    const float v = mul_rn(a, static_cast<float>(q[t]));
    out[t] = F::HAS_MIN ? sub_rn(v, m) : v;
  }
}

// Decode one whole block into QK floats.
template <class F>
JM_HD void decode_block(const typename F::Block& b, float* out) {
  static_assert(F::SUB % 8 == 0, "sub-blocks hold whole groups of 8");
  for (int s = 0; s < F::QK / F::SUB; ++s) {
    float a, m;
    F::scale_min(b, s, a, m);
    for (int i = s * F::SUB; i < (s + 1) * F::SUB; i += 8) decode8<F>(b, i, a, m, out + i);
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
