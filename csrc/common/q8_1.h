// SCALAR_GGUF's activation staging and its integer dot products with weight blocks (DESIGN.md §4).
//
// Staging, per 32 activations: d = max|x| / 127 in f32; q = round(x / d), half away from zero,
// with that f32 d (q = 0 where max|x| = 0, or where d underflows to 0); the scale the integer
// dot products use is d rounded to f16. A block holding NaN or Inf gets a NaN scale, so the
// non-finite value reaches the output instead of being masked.
#pragma once

#include <cmath>
#include <cstdint>

#include "fp16.h"
#include "gguf_blocks.h"
#include "gguf_formats.h"
#include "hd.h"

namespace jax_moe {

constexpr int QK8_1 = 32;

// Round half away from zero, as C's roundf.
JM_HD int round_away(float v) { return static_cast<int>(roundf(v)); }

// Stage 32 values (read through `load(i)`) into one q8_1 block.
template <class Load>
JM_HD void stage_q8_1(Load&& load, block_q8_1& out) {
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
JM_HD float dot_subblock_q8_1(const typename F::Block& w, int s, const block_q8_1* xs) {
  const int i0 = s * F::SUB;
  const block_q8_1& xb = xs[i0 / QK8_1];
  const int8_t* xq = xb.qs + (i0 % QK8_1);
  int32_t sumi = 0, sumx = 0;
  for (int g = 0; g < F::SUB; g += 8) {
    int q[8];
    F::quant8(w, i0 + g, q);
    for (int i = 0; i < 8; ++i) {
      sumi += q[i] * xq[g + i];
      if (F::HAS_MIN && F::SUB != QK8_1) sumx += xq[g + i];
    }
  }
  if (F::HAS_MIN && F::SUB == QK8_1) sumx = xb.sum;
  float a, m;
  F::scale_min(w, s, a, m);
  float part = a * static_cast<float>(sumi);
  if (F::HAS_MIN) part -= m * static_cast<float>(sumx);
  return xb.d * part;
}

// Dot product of one weight block (QK elements) with its QK / 32 staged activation blocks;
// mathematically equal to decode(w) . dequant(x_staged).
template <class F>
JM_HD float dot_block_q8_1(const typename F::Block& w, const block_q8_1* xs) {
  float acc = 0.0f;
  for (int s = 0; s < F::QK / F::SUB; ++s) acc += dot_subblock_q8_1<F>(w, s, xs);
  return acc;
}

}  // namespace jax_moe
