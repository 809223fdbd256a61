// The one view of every GGUF format that the codecs and all kernels share.
//
// Each format is described by a traits struct `Format<T>`:
//   Block            the block struct (gguf_blocks.h)
//   QK, SUB          elements per block and per sub-block (the span of one scale)
//   HAS_MIN          whether sub-blocks carry a min
//   quant8(b, i0)    the integer quants (signed; offsets applied) of elements i0 .. i0+7
//                    (i0 % 8 == 0) as 8 packed int8 (element i0 + t in byte t: the operand
//                    layout of dp4a), read with loads as wide as the layout allows (blocks start
//                    at multiples of their size in 16-byte-aligned rows); unpack8 gives ints
//   scale_min(b, s, a, m)  the f32 scale a and min m of sub-block s
// and element i decodes to  a * q_i - m  with a and m of sub-block i / SUB, computed
// with unfused f32 operations (MXFP4: q_i is E2M1's value doubled, a = 2^(e - 128), m = 0). That expression is ggml's dequantization for each format, so
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

// Each byte repeated: the masks and offsets that work on 8 packed quants at once.
JM_HD constexpr uint64_t bytes8(uint8_t b) { return 0x0101010101010101ull * b; }

// Packed unsigned bytes u (each small enough that u + bias < 256) to signed u - (128 - bias): no
// carry crosses a byte, and flipping each byte's top bit then subtracts 128.
JM_HD constexpr uint64_t offset_bytes(uint64_t u, uint8_t bias) { return (u + bytes8(bias)) ^ bytes8(0x80); }

// The 8 packed int8 quants as ints.
JM_HD void unpack8(uint64_t v, int* q) {
  for (int j = 0; j < 8; ++j) q[j] = static_cast<int8_t>(byte_of(v, j));
}

template <>
struct Format<GGMLType::Q8_0> {
  using Block = block_q8_0;
  static constexpr GGMLType type = GGMLType::Q8_0;
  static constexpr int QK = QK8_0, SUB = 32;
  static constexpr bool HAS_MIN = false;
  static JM_HD uint64_t quant8(const Block& b, int i0) {
    return load8<2>(reinterpret_cast<const uint8_t*>(b.qs) + i0);
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
  static JM_HD uint64_t quant8(const Block& b, int i0) {
    const int n = i0 >> 7, j = (i0 >> 5) & 3, l = i0 & 31;
    return (load8<4>(b.qs + 32 * n + l) >> (2 * j)) & bytes8(3);
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
  static JM_HD uint64_t quant8(const Block& b, int i0) {
    const int n = i0 >> 7, j = (i0 >> 5) & 3, l = i0 & 31;
    const uint64_t lo = (load8<2>(b.qs + 32 * n + l) >> (2 * j)) & bytes8(3);
    const uint64_t hi = (load8<2>(b.hmask + l) >> (4 * n + j)) & bytes8(1);
    return offset_bytes(lo | (hi << 2), 124);  // low 2 bits + 4 * high bit - 4
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
  static JM_HD uint64_t quant8(const Block& b, int i0) {
    const int c = i0 >> 6, l = i0 & 63;
    return (load8<8>(b.qs + 32 * c + (l & 31)) >> (l >= 32 ? 4 : 0)) & bytes8(0xF);
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
  static JM_HD uint64_t quant8(const Block& b, int i0) {
    const int c = i0 >> 6, l = i0 & 63, hi = l >= 32, ll = l & 31;
    const uint64_t lo = (load8<8>(b.qs + 32 * c + ll) >> (hi ? 4 : 0)) & bytes8(0xF);
    return lo | (((load8<8>(b.qh + ll) >> (2 * c + hi)) & bytes8(1)) << 4);
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
  static JM_HD uint64_t quant8(const Block& b, int i0) {
    const int n = i0 >> 7, quarter = (i0 >> 5) & 3, l = i0 & 31;
    const uint64_t lo = (load8<2>(b.ql + 64 * n + l + ((quarter & 1) ? 32 : 0)) >> ((quarter & 2) ? 4 : 0)) & bytes8(0xF);
    const uint64_t hi = (load8<2>(b.qh + 32 * n + l) >> (2 * quarter)) & bytes8(3);
    return offset_bytes(lo | (hi << 4), 96);  // 6 bits - 32
  }
  static JM_HD void scale_min(const Block& b, int s, float& a, float& m) {
    a = mul_rn(half_to_float(b.d), static_cast<float>(b.scales[s]));
    m = 0.0f;
  }
};

// ggml's GGML_E8M0_TO_FP32_HALF: half of the E8M0 scale 2^(e - 127), i.e. 2^(e - 128), as the
// f32 bit pattern ggml builds (e < 2 gives the subnormals 2^-128 and 2^-127).
JM_HD float e8m0_half(uint8_t e) {
  return bits_f32(e < 2 ? 0x00200000u << e : static_cast<uint32_t>(e - 1) << 23);
}

// __byte_perm(a, b, s) for selectors whose four nibbles are 0..7: byte n of the result is byte
// (s >> 4n) & 7 of the eight bytes b:a (a is bytes 0..3). On the device one PRMT; on the host the
// same selection, so the host tests run the device's algorithm.
JM_HD uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t s) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(a, b, s);
#else
  const uint64_t v = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t r = 0;
  for (int n = 0; n < 4; ++n) r |= static_cast<uint32_t>((v >> (8 * ((s >> (4 * n)) & 7))) & 0xFF) << (8 * n);
  return r;
#endif
}

// Four packed E2M1 codes (one per byte, 0..15) to their values doubled as signed int8, ggml's
// kvalues_mxfp4 {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, ..., -12}: the magnitude (code & 7) indexes the
// 8-byte table {0, 1, 2, 3, 4, 6, 8, 12} with one byte permute, and the sign bit (code & 8)
// negates its byte (0x80 - v has no borrow for v <= 12; flipping its top bit gives 256 - v).
JM_HD uint32_t e2m1_4(uint32_t codes) {
  const uint32_t s = codes | (codes >> 4);  // byte 0: c0 | c1 << 4; byte 2: c2 | c3 << 4
  const uint32_t sel = ((s & 0xFFu) | ((s >> 8) & 0xFF00u)) & 0x7777u;
  const uint32_t mag = byte_perm(0x03020100u, 0x0C080604u, sel);
  const uint32_t neg = (0x80808080u - mag) ^ 0x80808080u;
  const uint32_t sign = ((codes >> 3) & 0x01010101u) * 0xFFu;
  return mag ^ ((mag ^ neg) & sign);
}

// Eight packed E2M1 codes (one per byte) to eight signed int8 kvalues.
JM_HD uint64_t e2m1_bytes(uint64_t codes) {
  return e2m1_4(static_cast<uint32_t>(codes)) | (static_cast<uint64_t>(e2m1_4(static_cast<uint32_t>(codes >> 32))) << 32);
}

template <>
struct Format<GGMLType::MXFP4> {
  using Block = block_mxfp4;
  static constexpr GGMLType type = GGMLType::MXFP4;
  static constexpr int QK = QK_MXFP4, SUB = 32;
  static constexpr bool HAS_MIN = false;
  // 17-byte blocks: no alignment beyond a byte. The E2M1 codes of elements i0 .. i0+7, one per byte.
  static JM_HD uint64_t codes8(const Block& b, int i0) {
    return (load8<1>(b.qs + (i0 & 15)) >> ((i0 & 16) ? 4 : 0)) & bytes8(0xF);
  }
  static JM_HD uint64_t quant8(const Block& b, int i0) { return e2m1_bytes(codes8(b, i0)); }
  static JM_HD void scale_min(const Block& b, int, float& a, float& m) {
    a = e8m0_half(b.e);
    m = 0.0f;
  }
};

// The 32 bits at bit s (0 <= s < 32) of the 64-bit hi:lo: one funnel shift on the device.
JM_HD uint32_t funnel_r(uint32_t lo, uint32_t hi, int s) {
#if defined(__CUDA_ARCH__)
  return __funnelshift_r(lo, hi, s);
#else
  return s == 0 ? lo : (lo >> s) | (hi << (32 - s));
#endif
}

// MXFP4 as the tensor-core GEMV's lane c (0..3) sees a 256-element chunk (8 blocks, 136 bytes):
// it owns blocks 2c and 2c + 1, the 34 bytes at 34c. mxfp4_lane_addr says where they are: the
// five aligned 8-byte words from the 8-byte boundary at or below the lane's first byte hold them,
// since a row (K / 32 x 17 bytes) starts on a 2-byte boundary at least (8-byte where K % 256 == 0;
// not gpt-oss's K = 2880, 1530-byte rows), so that byte sits 0, 2, 4 or 6 = 2 x `at` bytes past
// the boundary and the last, 33 further on, inside the fifth word: no read goes past the 8-byte
// word that holds the lane's last byte (tests/cpp: mxfp4_gemv_rows).
struct Mxfp4LaneAddr {
  const uint8_t* words;  // the 8-byte boundary
  int at;                // the lane's first byte is 2 x at bytes past it
};
JM_HD Mxfp4LaneAddr mxfp4_lane_addr(const uint8_t* row, int64_t ch, int c) {
  const uintptr_t s = reinterpret_cast<uintptr_t>(row) + static_cast<uintptr_t>(ch * 136 + 34 * c);
  return {reinterpret_cast<const uint8_t*>(s & ~uintptr_t{7}), static_cast<int>(s & 7) >> 1};
}
// From the ten little-endian words w of those 40 bytes and `at`: each block's scale byte and its 16
// quant bytes as four words (the offset 2 x at is a word select and a 16-bit funnel shift).
// Where rows are 8-byte aligned, at = c.
struct Mxfp4Lane {
  uint32_t qa[4], qb[4];  // quant bytes qs[0..15] of blocks 2c and 2c + 1
  uint8_t ea, eb;         // their E8M0 scales
};
JM_HD Mxfp4Lane mxfp4_lane(const uint32_t (&w)[10], int at) {
  const bool up = at >= 2;
  const int s = 16 * (at & 1);
  uint32_t W[9];  // W[i]: the lane's bytes 4i .. 4i + 3
  for (int i = 0; i < 9; ++i) W[i] = funnel_r(up ? w[i + 1] : w[i], up ? (i + 2 < 10 ? w[i + 2] : 0u) : w[i + 1], s);
  Mxfp4Lane l;
  for (int j = 0; j < 4; ++j) {
    l.qa[j] = funnel_r(W[j], W[j + 1], 8);       // bytes 1 .. 16
    l.qb[j] = funnel_r(W[4 + j], W[5 + j], 16);  // bytes 18 .. 33
  }
  l.ea = static_cast<uint8_t>(W[0] & 0xFF);
  l.eb = static_cast<uint8_t>((W[4] >> 8) & 0xFF);
  return l;
}
// Group g (0..3: elements 8g .. 8g + 7 of a block) of a block's quant words q: the same eight int8
// values as Format<MXFP4>::quant8(b, 8g).
JM_HD uint64_t mxfp4_group8(const uint32_t (&q)[4], int g) {
  const int sh = g >= 2 ? 4 : 0;
  const uint32_t lo = (q[2 * (g & 1)] >> sh) & 0x0F0F0F0Fu, hi = (q[2 * (g & 1) + 1] >> sh) & 0x0F0F0F0Fu;
  return e2m1_bytes(lo | (static_cast<uint64_t>(hi) << 32));
}

// MXFP4 straight to bfloat16, for the tensor-core GEMV (bf16 activations): two E2M1 codes at bits
// 0-3 and 16-19 of q (bits 4-7 and 20-23 are ignored; bytes 1 and 3 must be zero) become two bf16
// whose bits are the codes': the sign to bit 15, E2M1's two exponent bits and its mantissa bit to
// bf16's two lowest exponent bits and top mantissa bit (bits 6-8). A bf16 with exponent field E =
// 0..3 and top mantissa bit m is 2^-126 x (E > 0 ? 2^(E - 1) (1 + m / 2) : m / 2): the E2M1 value
// times 2^-126, its own subnormals (0 and 0.5) bf16's subnormals. Code 8 gives -0 (ggml: +0).
JM_HD uint32_t e2m1_bf16x2(uint32_t q) { return ((q << 6) | (q << 12)) & 0x81C081C0u; }

// Eight E2M1 codes, one in the low nibble of each byte of a (elements 0-3) and b (4-7), as four
// bf16 pairs (elements 2i, 2i + 1 in pair i, the first in the low half) of the values x 2^-126:
// bytes 0 and 1 (2 and 3) of a word spread to bytes 0 and 2 by one byte permute.
struct Bf16x2x4 { uint32_t v[4]; };
JM_HD Bf16x2x4 e2m1_bf16x8(uint32_t a, uint32_t b) {
  return {{e2m1_bf16x2(byte_perm(a, 0, 0x4140u)), e2m1_bf16x2(byte_perm(a, 0, 0x4342u)),
           e2m1_bf16x2(byte_perm(b, 0, 0x4140u)), e2m1_bf16x2(byte_perm(b, 0, 0x4342u))}};
}

// Group g (0..3) of a block's quant words q (mxfp4_group8's elements 8g .. 8g + 7), as e2m1_bf16x8.
JM_HD Bf16x2x4 mxfp4_bf16_group8(const uint32_t (&q)[4], int g) {
  const int sh = g >= 2 ? 4 : 0;
  return e2m1_bf16x8(q[2 * (g & 1)] >> sh, q[2 * (g & 1) + 1] >> sh);
}

// The bf16 pair factors that take mxfp4_bf16_group8's values to ggml's kvalue x e8m0_half(e) =
// E2M1 x 2^(e - 127), each product rounded once (to nearest even): s1 = 2^(e - 1) for e <= 128 and
// s2 = 1 (the one product is the value, rounded once); for e > 128 (2^(e - 1) is past bf16's range)
// s1 = 2^127, whose product is exact (2 x E2M1, at most 12), and s2 = 2^(e - 128).
struct Mxfp4Bf16Scale { uint32_t s1, s2; };
JM_HD Mxfp4Bf16Scale mxfp4_bf16_scale(uint8_t e) {
  const uint32_t lo = (e <= 128 ? e + 126u : 254u) << 7, hi = (e <= 128 ? 127u : e - 1u) << 7;
  return {lo | (lo << 16), hi | (hi << 16)};
}

// The 32 bytes at the 2-byte-aligned p as eight little-endian words, from five aligned 8-byte
// loads (a word select and a 16-bit funnel shift by the misalignment) instead of sixteen 2-byte
// ones: the fused GEMM reads its shared-memory raw stage so. Reads up to 6 bytes before p and 8
// past p + 32: callers keep them inside the block.
JM_HD void words8_at2(const uint8_t* p, uint32_t (&w)[8]) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  const auto* q = reinterpret_cast<const uint32_t*>(a & ~uintptr_t{7});
  uint32_t v[10];
  for (int i = 0; i < 10; i += 2) {
    const uint64_t t = *reinterpret_cast<const uint64_t*>(q + i);
    v[i] = static_cast<uint32_t>(t);
    v[i + 1] = static_cast<uint32_t>(t >> 32);
  }
  const bool up = (a & 4) != 0;
  const int sh = 8 * static_cast<int>(a & 2);
  for (int i = 0; i < 8; ++i) w[i] = funnel_r(up ? v[i + 1] : v[i], up ? v[i + 2] : v[i + 1], sh);
}

// Q8_0's four pieces of one block (its 32 qs bytes, 2 bytes into the 34-byte block, which is
// 2-byte aligned) as Format<Q8_0>::quant8 gives them, from aligned 4-byte loads: eight where the qs
// bytes are 4-aligned, else nine from 2 bytes before them (the block's d) to 2 past the block,
// which the fused GEMM's raw stage rows hold (plan.h gguf_raw_row_bytes), and a 16-bit funnel shift.
JM_HD void q8_0_pieces(const block_q8_0& b, uint64_t* q) {
  const auto a = reinterpret_cast<uintptr_t>(b.qs);
  const auto* w = reinterpret_cast<const uint32_t*>(a & ~uintptr_t{3});
  const int sh = 8 * static_cast<int>(a & 2);
  uint32_t v[9];
  for (int i = 0; i < 8; ++i) v[i] = w[i];
  v[8] = sh != 0 ? w[8] : 0u;
  for (int p = 0; p < 4; ++p)
    q[p] = static_cast<uint64_t>(funnel_r(v[2 * p], v[2 * p + 1], sh)) |
           (static_cast<uint64_t>(funnel_r(v[2 * p + 1], v[2 * p + 2], sh)) << 32);
}

// Q3_K's quants of DP pieces (elements i0 + 8p, p = 0 .. DP - 1, of one block; i0 % 32 == 0 and
// 8 DP <= 64, so all in one half n = i0 / 128), as Format<Q3_K>::quant8 gives each: the half's 32
// qs bytes and the block's 32 hmask bytes read once (words8_at2), then per piece the low 2 bits 2j
// of qs[32n + l] and the high bit 4n + j of hmask[l] (l = (i0 + 8p) % 32, j = (i0 + 8p) / 32 % 4).
template <int DP>
JM_HD void q3k_pieces(const block_q3_K& b, int i0, uint64_t (&q)[DP]) {
  static_assert(DP * 8 <= 64, "the pieces lie in one 128-element half");
  const int n = i0 >> 7;
  uint32_t qs[8], hm[8];
  words8_at2(b.qs + 32 * n, qs);
  words8_at2(b.hmask, hm);
  for (int p = 0; p < DP; ++p) {
    const int e = (i0 & 127) + 8 * p, j = e >> 5, wi = (e & 31) >> 2;
    const uint32_t lo0 = (qs[wi] >> (2 * j)) & 0x03030303u, hi0 = (hm[wi] >> (4 * n + j)) & 0x01010101u;
    const uint32_t lo1 = (qs[wi + 1] >> (2 * j)) & 0x03030303u, hi1 = (hm[wi + 1] >> (4 * n + j)) & 0x01010101u;
    q[p] = offset_bytes(static_cast<uint64_t>(lo0 | (hi0 << 2)) | (static_cast<uint64_t>(lo1 | (hi1 << 2)) << 32), 124);
  }
}

// Q6_K's quants of DP pieces (elements i0 + 8p of one block; i0 % (8 DP) == 0 and 32 <= 8 DP <= 64,
// 8 DP <= 64, so in one half n = i0 / 128 and quarters i0 / 32 % 4 onward), as Format<Q6_K>::quant8
// gives each: the low nibbles' 32 ql bytes of each quarter's parity and the half's 32 qh bytes read
// once (words8_at2), then per piece nibble (quarter & 2) of ql[64n + 32 (quarter & 1) + l] and bits
// 2 quarter of qh[32n + l]. Reads stay inside the block but for 6 bytes before it.
template <int DP>
JM_HD void q6k_pieces(const block_q6_K& b, int i0, uint64_t (&q)[DP]) {
  static_assert(DP * 8 == 32 || DP * 8 == 64, "the pieces fill one quarter, or two of one half");
  const int n = i0 >> 7, q0 = (i0 >> 5) & 3;
  uint32_t ql[2][8], qh[8];
  words8_at2(b.ql + 64 * n + 32 * (q0 & 1), ql[0]);
  if constexpr (DP * 8 > 32) words8_at2(b.ql + 64 * n + 32 * ((q0 + 1) & 1), ql[1]);
  words8_at2(b.qh + 32 * n, qh);
  for (int p = 0; p < DP; ++p) {
    const int second = 8 * p >= 32 ? 1 : 0;  // a compile-time index once unrolled
    const int quarter = q0 + second, wi = ((8 * p) & 31) >> 2;
    const uint32_t(&lw)[8] = ql[second];
    const int nib = (quarter & 2) ? 4 : 0;
    auto word = [&](int k) {
      return ((lw[k] >> nib) & 0x0F0F0F0Fu) | (((qh[k] >> (2 * quarter)) & 0x03030303u) << 4);
    };
    q[p] = offset_bytes(static_cast<uint64_t>(word(wi)) | (static_cast<uint64_t>(word(wi + 1)) << 32), 96);
  }
}

// Decode elements i0 .. i0+7 (one aligned group inside one sub-block) given that sub-block's
// scale and min: ggml's formula, unfused f32.
template <class F>
JM_HD void decode8(const typename F::Block& b, int i0, float a, float m, float* out) {
  int q[8];
  unpack8(F::quant8(b, i0), q);
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
    case GGMLType::MXFP4: fn(Format<GGMLType::MXFP4>{}); return true;
    default: return false;
  }
}

}  // namespace jax_moe
