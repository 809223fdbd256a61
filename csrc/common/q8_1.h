// SCALAR_GGUF's activation staging and its integer dot products with weight blocks (docs/contract.md §4).
//
// Staging, per 32 activations: d = max|x| / 127 in f32; q = round(x / d), half away from zero,
// with that f32 d (q = 0 where max|x| = 0, or where d underflows to 0); the scale the integer
// dot products use is d rounded to f16. A block holding NaN or Inf gets a NaN scale, so the
// non-finite value reaches the output instead of being masked.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "fp16.h"
#include "gguf_blocks.h"
#include "gguf_formats.h"
#include "hd.h"

namespace jax_moe {

constexpr int QK8_1 = 32;

// Activations staged for SCALAR_GGUF: 32 values as int8 with one scale (docs/contract.md §4). Not
// ggml's 36-byte block_q8_1 (f16 scale and sum): this one holds the f16-rounded scale as f32
// and an integer sum, 40 bytes.
// `d` is the f16-rounded scale held as f32 (the value the integer dot products use); `sum` is
// the integer sum of the quants, for the formats with mins.
struct q8_1_staged {
  float d;
  int32_t sum;
  int8_t qs[32];
};
static_assert(sizeof(q8_1_staged) == 40, "staged activation block is 40 bytes");


// Four packed int8 (4-byte aligned) as one word.
JM_HD uint32_t load4(const int8_t* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const uint32_t*>(p);
#else
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
#endif
}

// c plus the dot product of two words of 4 packed int8 (dp4a on the device).
JM_HD int32_t dot4(uint32_t a, uint32_t b, int32_t c) {
#if defined(__CUDA_ARCH__)
  return __dp4a(static_cast<int>(a), static_cast<int>(b), c);
#else
  for (int j = 0; j < 4; ++j)
    c += static_cast<int8_t>(static_cast<uint8_t>(a >> (8 * j))) * static_cast<int8_t>(static_cast<uint8_t>(b >> (8 * j)));
  return c;
#endif
}

// Round half away from zero, as C's roundf.
JM_HD int round_away(float v) { return static_cast<int>(roundf(v)); }

// Stage 32 values (read through `load(i)`) into one q8_1 block.
template <class Load>
JM_HD void stage_q8_1(Load&& load, q8_1_staged& out) {
  float amax = 0.0f;
  bool finite = true;
  for (int i = 0; i < QK8_1; ++i) {
    const float v = load(i);
    const float a = fabsf(v);
    if (!(a <= 3.402823466e38f)) finite = false;  // NaN or Inf
    amax = a > amax ? a : amax;
  }
  const float d = amax / 127.0f;
  int32_t sum = 0;
  if (!finite) {
    for (int i = 0; i < QK8_1; ++i) out.qs[i] = 0;
    out.d = NAN;
  } else {
    for (int i = 0; i < QK8_1; ++i) {
      const int q = d == 0.0f ? 0 : round_away(load(i) / d);
      out.qs[i] = static_cast<int8_t>(q);
      sum += q;
    }
    out.d = half_to_float(float_to_half(d));
  }
  out.sum = sum;
}

// Dot product of sub-block s of one weight block with the staged activations that cover that
// block (xs points at the block's first q8_1 block): dx * (a_s * sum(q_w * q_x) - m_s * sum(q_x)),
// integer sums, f32 outside them.
template <class F>
JM_HD float dot_subblock_q8_1(const typename F::Block& w, int s, const q8_1_staged* xs) {
  const int i0 = s * F::SUB;
  const q8_1_staged& xb = xs[i0 / QK8_1];
  const int8_t* xq = xb.qs + (i0 % QK8_1);
  int32_t sumi = 0, sumx = 0;
  for (int g = 0; g < F::SUB; g += 8) {
    const uint64_t q = F::quant8(w, i0 + g);
    const uint32_t x0 = load4(xq + g), x1 = load4(xq + g + 4);
    sumi = dot4(static_cast<uint32_t>(q), x0, sumi);
    sumi = dot4(static_cast<uint32_t>(q >> 32), x1, sumi);
    if (F::HAS_MIN && F::SUB != QK8_1) sumx = dot4(0x01010101u, x1, dot4(0x01010101u, x0, sumx));
  }
  if (F::HAS_MIN && F::SUB == QK8_1) sumx = xb.sum;
  float a, m;
  F::scale_min(w, s, a, m);
  if constexpr (F::type == GGMLType::MXFP4) {
    // MXFP4's scale reaches 2^127, so a decoded weight a * q can overflow f32 (as in gguf-py's
    // and our decoders). The integer sum would then hide the infinities (a zero sum, or one that
    // cancels): take those rare sub-blocks through the decoded weights, so that an infinite
    // weight reaches the output as it does through decode(w) . dequant(x_staged).
    if (!(a * 12.0f <= 3.402823466e38f)) {
      float acc = 0.0f;
      for (int g = 0; g < F::SUB; g += 8) {
        int q[8];
        unpack8(F::quant8(w, i0 + g), q);
        for (int t = 0; t < 8; ++t) acc += (a * static_cast<float>(q[t])) * (xb.d * static_cast<float>(xq[g + t]));
      }
      return acc;
    }
  }
  float part = a * static_cast<float>(sumi);
  if (F::HAS_MIN) part -= m * static_cast<float>(sumx);
  return xb.d * part;
}

// Dot product of one weight block (QK elements) with its QK / 32 staged activation blocks;
// mathematically equal to decode(w) . dequant(x_staged).
template <class F>
JM_HD float dot_block_q8_1(const typename F::Block& w, const q8_1_staged* xs) {
  float acc = 0.0f;
  for (int s = 0; s < F::QK / F::SUB; ++s) acc += dot_subblock_q8_1<F>(w, s, xs);
  return acc;
}

}  // namespace jax_moe
