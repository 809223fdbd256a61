// GGUF block formats: one plain struct per format, laid out byte for byte as ggml stores them,
// with each size asserted at compile time. The layouts are ggml's (ggml-common.h); the code is
// ours.
#pragma once

#include <cstddef>
#include <cstdint>

namespace jax_moe {

// ggml type ids (part of the GGUF file format and of this library's ABI).
enum class GGMLType : int32_t {
  F32 = 0,
  F16 = 1,
  Q8_0 = 8,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  BF16 = 30,
  MXFP4 = 39,
};

constexpr int QK8_0 = 32;   // elements per Q8_0 block
constexpr int QK_K = 256;   // elements per K-quant super-block
constexpr int K_SCALE_SIZE = 12;
constexpr int QK_MXFP4 = 32;  // elements per MXFP4 block

// 8-bit: y = d * q.
struct block_q8_0 {
  uint16_t d;          // fp16 scale
  int8_t qs[QK8_0];    // quants
};
static_assert(sizeof(block_q8_0) == 34, "Q8_0 block is 34 bytes");

// 2-bit K-quant: 16 sub-blocks of 16, 4-bit scale and 4-bit min each.
struct block_q2_K {
  uint8_t scales[QK_K / 16];  // low nibble: scale, high nibble: min
  uint8_t qs[QK_K / 4];       // 2-bit quants
  uint16_t d;                 // fp16 super-block scale for the scales
  uint16_t dmin;              // fp16 super-block scale for the mins
};
static_assert(sizeof(block_q2_K) == 84, "Q2_K block is 84 bytes");

// 3-bit K-quant: 16 sub-blocks of 16, signed 6-bit scales, no mins.
struct block_q3_K {
  uint8_t hmask[QK_K / 8];  // high bit of each quant
  uint8_t qs[QK_K / 4];     // low 2 bits of each quant
  uint8_t scales[12];       // 16 scales of 6 bits, packed
  uint16_t d;               // fp16 super-block scale
};
static_assert(sizeof(block_q3_K) == 110, "Q3_K block is 110 bytes");

// 4-bit K-quant: 8 sub-blocks of 32, 6-bit scale and min each.
struct block_q4_K {
  uint16_t d;                    // fp16 super-block scale for the scales
  uint16_t dmin;                 // fp16 super-block scale for the mins
  uint8_t scales[K_SCALE_SIZE];  // 8 scales and 8 mins of 6 bits, packed
  uint8_t qs[QK_K / 2];          // 4-bit quants
};
static_assert(sizeof(block_q4_K) == 144, "Q4_K block is 144 bytes");

// 5-bit K-quant: 8 sub-blocks of 32, 6-bit scale and min each.
struct block_q5_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[K_SCALE_SIZE];
  uint8_t qh[QK_K / 8];  // high bit of each quant
  uint8_t qs[QK_K / 2];  // low 4 bits of each quant
};
static_assert(sizeof(block_q5_K) == 176, "Q5_K block is 176 bytes");

// 6-bit K-quant: 16 sub-blocks of 16, signed 8-bit scales, no mins.
struct block_q6_K {
  uint8_t ql[QK_K / 2];      // low 4 bits of each quant
  uint8_t qh[QK_K / 4];      // high 2 bits of each quant
  int8_t scales[QK_K / 16];  // 8-bit scales
  uint16_t d;                // fp16 super-block scale
};
static_assert(sizeof(block_q6_K) == 210, "Q6_K block is 210 bytes");

// 4-bit microscaling float (OCP MX, gpt-oss's expert format): y = 2^(e - 128) * kvalue(q), the
// kvalues being E2M1's values doubled. Element j is the low nibble of qs[j], element j + 16 the
// high nibble (as in Q4_0).
struct block_mxfp4 {
  uint8_t e;                  // E8M0 shared exponent
  uint8_t qs[QK_MXFP4 / 2];   // E2M1 codes: sign bit, 2 exponent bits, 1 mantissa bit
};
static_assert(sizeof(block_mxfp4) == 17, "MXFP4 block is 17 bytes");

// Elements and bytes per block of a quantized type; 0 for types this library does not run.
constexpr int block_elems(GGMLType t) {
  return t == GGMLType::Q8_0    ? QK8_0
         : t == GGMLType::MXFP4 ? QK_MXFP4
         : (t == GGMLType::Q2_K || t == GGMLType::Q3_K || t == GGMLType::Q4_K ||
            t == GGMLType::Q5_K || t == GGMLType::Q6_K)
             ? QK_K
             : 0;
}

constexpr int block_bytes(GGMLType t) {
  switch (t) {
    case GGMLType::Q8_0: return sizeof(block_q8_0);
    case GGMLType::Q2_K: return sizeof(block_q2_K);
    case GGMLType::Q3_K: return sizeof(block_q3_K);
    case GGMLType::Q4_K: return sizeof(block_q4_K);
    case GGMLType::Q5_K: return sizeof(block_q5_K);
    case GGMLType::Q6_K: return sizeof(block_q6_K);
    case GGMLType::MXFP4: return sizeof(block_mxfp4);
    default: return 0;
  }
}

constexpr bool is_quantized(GGMLType t) { return block_elems(t) != 0; }

inline const char* type_name(GGMLType t) {
  switch (t) {
    case GGMLType::F32: return "F32";
    case GGMLType::F16: return "F16";
    case GGMLType::BF16: return "BF16";
    case GGMLType::Q8_0: return "Q8_0";
    case GGMLType::Q2_K: return "Q2_K";
    case GGMLType::Q3_K: return "Q3_K";
    case GGMLType::Q4_K: return "Q4_K";
    case GGMLType::Q5_K: return "Q5_K";
    case GGMLType::Q6_K: return "Q6_K";
    case GGMLType::MXFP4: return "MXFP4";
    default: return "unknown";
  }
}

}  // namespace jax_moe
