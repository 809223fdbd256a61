// Host quantizers for the GGUF block formats (DESIGN.md §3).
//
// Q8_0 reproduces ggml's reference quantizer bit for bit. The K-quants work in three steps per
// super-block: fit a scale (and min) to every sub-block by a least-squares search over candidate
// scales; derive the fp16 super-block scale(s) from those; then, for every sub-block, search the
// integer scales (and mins) around the rounded fit for the pair whose requantized values have
// the least squared error. All the arithmetic stays in float (rounding by the 1.5 * 2^23 trick,
// clamping that sends NaN to the low end), so NaN and infinite inputs never reach a float -> int
// conversion; fp16 scales are kept finite. Must not be built with -ffast-math (the rounding
// trick and Q8_0's exactness need IEEE semantics).
#include "quantize.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "../common/gguf_formats.h"

namespace jax_moe {
namespace {

constexpr float kHalfMax = 65504.0f;  // largest finite fp16

// Nearest integer of v as a float, ties to even, exact for |v| < 2^22. Larger values come back
// about unchanged and NaN stays NaN; callers clamp.
inline float round_nearest(float v) { return (v + 12582912.0f) - 12582912.0f; }

// v clamped to [lo, hi]; NaN gives lo.
inline float clampf(float v, float lo, float hi) { return std::min(hi, std::max(lo, v)); }

// fp16 bits of a super-block scale, forced finite: NaN becomes 0, magnitudes clamp to 65504.
inline uint16_t half_finite(float v) {
  if (!(v == v)) return 0;
  return float_to_half(clampf(v, -kHalfMax, kHalfMax));
}

// Sum of v[0..N) (N a power of two >= 4) by pairwise halving, which overwrites v: a fixed order
// made of element-wise adds, so the compiler vectorizes it without reassociating.
template <int N>
inline float tree_sum(float* v) {
  static_assert(N >= 4 && (N & (N - 1)) == 0, "N must be a power of two >= 4");
  if constexpr (N > 4) {
    for (int i = 0; i < N / 2; ++i) v[i] += v[i + N / 2];
    return tree_sum<N / 2>(v);
  } else {
    return (v[0] + v[2]) + (v[1] + v[3]);
  }
}

// Sum of a[i] * b[i] over N.
template <int N>
inline float dot(const float* a, const float* b) {
  float p[N];
  for (int i = 0; i < N; ++i) p[i] = a[i] * b[i];
  return tree_sum<N>(p);
}

// Sum of a[i] over N.
template <int N>
inline float sum(const float* a) {
  float p[N];
  for (int i = 0; i < N; ++i) p[i] = a[i];
  return tree_sum<N>(p);
}

// ------------------------------------------------------------------------------------------
// Q8_0: ggml's reference, bit for bit.

// roundf (half away from zero) of v, exact for |v| <= 127; NaN gives 0, saturates at +-127.
inline int round_away_q8(float v) {
  if (!(std::fabs(v) <= 127.0f)) return v > 0.0f ? 127 : (v < 0.0f ? -127 : 0);
  const int t = static_cast<int>(v);          // truncation toward zero
  const float r = v - static_cast<float>(t);  // exact fractional part
  return t + (r >= 0.5f ? 1 : 0) - (r <= -0.5f ? 1 : 0);
}

// One Q8_0 block: d = max|x| / 127, q = roundf(x * (1/d)), d stored as fp16. If d overflows
// fp16 the block saturates against the largest finite scale instead of storing infinity.
void quantize_q8_0(const float* x, block_q8_0& b) {
  float amax = 0.0f;
  for (int i = 0; i < QK8_0; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float d = amax / 127.0f;
  float id = d == 0.0f ? 0.0f : 1.0f / d;
  b.d = float_to_half(d);
  if (!(half_to_float(b.d) <= kHalfMax)) {
    b.d = half_finite(d);
    id = 1.0f / kHalfMax;
  }
  for (int i = 0; i < QK8_0; ++i) b.qs[i] = static_cast<int8_t>(round_away_q8(x[i] * id));
}

// ------------------------------------------------------------------------------------------
// Sub-block fits (unweighted least squares: the quality measure is the plain squared error).

// Candidate inverse scales of a fit: (levels + first + step * i) / range for i in [0, count).
struct Grid {
  float first, step;
  int count;
};

// Fit x ~ a*l - m with integer l in [0, NL], a > 0 and m >= 0 (the range always covers 0, as the
// K-quants subtract their mins). Each candidate inverse scale of `grid` quantizes the sub-block,
// the least-squares (a, m) for those levels is solved in closed form, and the best candidate is
// polished by alternating requantization and refit. A constant sub-block gives a = 0 and
// m = -min(x, 0).
template <int N, int NL>
void fit_scale_min(const float* x, const Grid& grid, float& a, float& m) {
  float lo = x[0], hi = x[0];
  for (int i = 1; i < N; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  lo = std::min(lo, 0.0f);
  a = 0.0f;
  m = -lo;
  if (!(hi > lo)) return;
  const float sx = sum<N>(x), sxx = dot<N>(x, x);
  float best = INFINITY, best_a = 0.0f, best_b = lo, L[N];
  // Least-squares x ~ sa*L + sb (sb <= 0) for the levels in L; keeps it if it beats `best`.
  auto consider = [&]() {
    const float sl = sum<N>(L), sll = dot<N>(L, L), sxl = dot<N>(x, L);
    const float det = N * sll - sl * sl;
    if (!(det > 0.0f)) return false;
    float sa = (N * sxl - sx * sl) / det, sb = (sll * sx - sl * sxl) / det;
    if (sb > 0.0f) {
      sb = 0.0f;
      sa = sxl / sll;
    }
    if (!(sa > 0.0f)) return false;
    const float err = sxx + sa * sa * sll + sb * sb * N - 2.0f * sa * sxl - 2.0f * sb * sx +
                      2.0f * sa * sb * sl;
    if (!(err < best)) return false;
    best = err;
    best_a = sa;
    best_b = sb;
    return true;
  };
  const float range = hi - lo;
  for (int s = 0; s < grid.count; ++s) {
    const float iscale = (NL + grid.first + grid.step * s) / range;
    for (int i = 0; i < N; ++i) L[i] = clampf(round_nearest(iscale * (x[i] - lo)), 0.0f, NL);
    consider();
  }
  for (int it = 0; it < 4 && best_a > 0.0f; ++it) {
    const float ia = 1.0f / best_a, b = best_b;
    for (int i = 0; i < N; ++i) L[i] = clampf(round_nearest(ia * (x[i] - b)), 0.0f, NL);
    if (!consider()) break;
  }
  if (best_a > 0.0f) {
    a = best_a;
    m = -best_b;
  }
}

// Fit x ~ a*l with integer l in [-NL, NL - 1], maximizing (sum x l)^2 / sum l^2 (least squares).
// The candidates map the largest-magnitude value to about -NL (so it can use the extra negative
// level); the best is polished by requantization and refit. Returns a (0 for an all-zero x).
template <int N, int NL>
float fit_scale(const float* x, const Grid& grid) {
  float vmax = 0.0f;
  for (int i = 0; i < N; ++i)
    if (std::fabs(x[i]) > std::fabs(vmax)) vmax = x[i];
  if (vmax == 0.0f) return 0.0f;
  float best = 0.0f, best_a = 0.0f, L[N];
  auto consider = [&]() {
    const float sll = dot<N>(L, L), sxl = dot<N>(x, L);
    if (!(sll > 0.0f)) return false;
    const float score = sxl * sxl / sll;
    if (!(score > best)) return false;
    best = score;
    best_a = sxl / sll;
    return true;
  };
  for (int s = 0; s < grid.count; ++s) {
    const float iscale = -(NL + grid.first + grid.step * s) / vmax;
    for (int i = 0; i < N; ++i) L[i] = clampf(round_nearest(iscale * x[i]), -NL, NL - 1);
    consider();
  }
  for (int it = 0; it < 4 && best_a != 0.0f; ++it) {
    const float ia = 1.0f / best_a;
    for (int i = 0; i < N; ++i) L[i] = clampf(round_nearest(ia * x[i]), -NL, NL - 1);
    if (!consider()) break;
  }
  return best_a;
}

// Levels of a sub-block requantized against the decoder's scale a and min m (m = 0 for the
// symmetric formats), as floats in [LO, HI]. A zero scale gives level 0 (clamped into range).
template <int N, int LO, int HI>
inline void levels(const float* x, float a, float m, float* L) {
  const float ia = a != 0.0f ? 1.0f / a : 0.0f;
  for (int i = 0; i < N; ++i) L[i] = clampf(round_nearest((x[i] + m) * ia), LO, HI);
}

// Squared error of a sub-block decoded (as the decoder does) with scale a and min m.
template <int N, int LO, int HI>
inline float requant_error(const float* x, float a, float m) {
  float L[N], e[N];
  levels<N, LO, HI>(x, a, m, L);
  for (int i = 0; i < N; ++i) e[i] = sub_rn(mul_rn(a, L[i]), m) - x[i];
  return dot<N>(e, e);
}

// Codes (level - LO, in [0, HI - LO]) of a sub-block requantized with scale a and min m.
template <int N, int LO, int HI>
inline void requant_codes(const float* x, float a, float m, uint8_t* codes) {
  float L[N];
  levels<N, LO, HI>(x, a, m, L);
  for (int i = 0; i < N; ++i) codes[i] = static_cast<uint8_t>(static_cast<int>(L[i]) - LO);
}

// ------------------------------------------------------------------------------------------
// Per-format encoder parameters and bit packing (the inverse of Format<T>::quant/scale_min).
// Asymmetric formats: levels 0..NL, integer scales and mins 0..SMAX. Symmetric formats: levels
// -NL..NL-1 (stored as level + NL), integer scales -SMAX-1..SMAX. `grid` is the fit's candidate
// grid and R the radius of the integer scale (and min) search.

template <GGMLType T>
struct Encoder;

// Pack 8 six-bit scales and mins the way k4_scale_min unpacks them (Q4_K, Q5_K).
inline void pack_k4_scales(uint8_t* q, const int* sc, const int* mn) {
  for (int j = 0; j < 4; ++j) {
    q[j] = static_cast<uint8_t>(sc[j] | ((sc[j + 4] >> 4) << 6));
    q[j + 4] = static_cast<uint8_t>(mn[j] | ((mn[j + 4] >> 4) << 6));
    q[j + 8] = static_cast<uint8_t>((sc[j + 4] & 0xF) | ((mn[j + 4] & 0xF) << 4));
  }
}

template <>
struct Encoder<GGMLType::Q2_K> {
  static constexpr bool ASYM = true;
  static constexpr int NL = 3, SMAX = 15, R = 1;
  static constexpr Grid grid{-0.5f, 0.1f, 16};
  static void pack(block_q2_K& b, const uint8_t* L, const int* sc, const int* mn, uint16_t d,
                   uint16_t dmin) {
    for (int s = 0; s < QK_K / 16; ++s) b.scales[s] = static_cast<uint8_t>(sc[s] | (mn[s] << 4));
    std::memset(b.qs, 0, sizeof b.qs);
    for (int i = 0; i < QK_K; ++i)
      b.qs[32 * (i >> 7) + (i & 31)] |= static_cast<uint8_t>(L[i] << (2 * ((i >> 5) & 3)));
    b.d = d;
    b.dmin = dmin;
  }
};

template <>
struct Encoder<GGMLType::Q4_K> {
  static constexpr bool ASYM = true;
  static constexpr int NL = 15, SMAX = 63, R = 1;
  static constexpr Grid grid{-1.0f, 0.1f, 21};
  static void pack(block_q4_K& b, const uint8_t* L, const int* sc, const int* mn, uint16_t d,
                   uint16_t dmin) {
    b.d = d;
    b.dmin = dmin;
    pack_k4_scales(b.scales, sc, mn);
    for (int c = 0; c < 4; ++c)
      for (int l = 0; l < 32; ++l)
        b.qs[32 * c + l] = static_cast<uint8_t>(L[64 * c + l] | (L[64 * c + 32 + l] << 4));
  }
};

template <>
struct Encoder<GGMLType::Q5_K> {
  static constexpr bool ASYM = true;
  static constexpr int NL = 31, SMAX = 63, R = 1;
  static constexpr Grid grid{-0.5f, 0.1f, 16};
  static void pack(block_q5_K& b, const uint8_t* L, const int* sc, const int* mn, uint16_t d,
                   uint16_t dmin) {
    b.d = d;
    b.dmin = dmin;
    pack_k4_scales(b.scales, sc, mn);
    std::memset(b.qh, 0, sizeof b.qh);
    for (int c = 0; c < 4; ++c)
      for (int l = 0; l < 32; ++l) {
        const int lo = L[64 * c + l], hi = L[64 * c + 32 + l];
        b.qs[32 * c + l] = static_cast<uint8_t>((lo & 0xF) | ((hi & 0xF) << 4));
        b.qh[l] |= static_cast<uint8_t>(((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1)));
      }
  }
};

template <>
struct Encoder<GGMLType::Q3_K> {
  static constexpr bool ASYM = false;
  static constexpr int NL = 4, SMAX = 31, R = 1;
  static constexpr Grid grid{-0.9f, 0.1f, 19};
  static void pack(block_q3_K& b, const uint8_t* L, const int* sc, uint16_t d) {
    std::memset(&b, 0, sizeof b);
    for (int i = 0; i < QK_K; ++i) {
      const int n = i >> 7, j = (i >> 5) & 3, l = i & 31;
      b.qs[32 * n + l] |= static_cast<uint8_t>((L[i] & 3) << (2 * j));
      b.hmask[l] |= static_cast<uint8_t>((L[i] >> 2) << (4 * n + j));
    }
    for (int j = 0; j < QK_K / 16; ++j) {
      const int u = sc[j] + 32;
      b.scales[j & 7] |= static_cast<uint8_t>((u & 0xF) << (j < 8 ? 0 : 4));
      b.scales[8 + (j & 3)] |= static_cast<uint8_t>((u >> 4) << (2 * (j >> 2)));
    }
    b.d = d;
  }
};

template <>
struct Encoder<GGMLType::Q6_K> {
  static constexpr bool ASYM = false;
  static constexpr int NL = 32, SMAX = 127, R = 1;
  static constexpr Grid grid{-0.9f, 0.1f, 19};
  static void pack(block_q6_K& b, const uint8_t* L, const int* sc, uint16_t d) {
    std::memset(b.ql, 0, sizeof b.ql);
    std::memset(b.qh, 0, sizeof b.qh);
    for (int i = 0; i < QK_K; ++i) {
      const int n = i >> 7, quarter = (i >> 5) & 3, l = i & 31;
      b.ql[64 * n + l + ((quarter & 1) ? 32 : 0)] |=
          static_cast<uint8_t>((L[i] & 0xF) << ((quarter & 2) ? 4 : 0));
      b.qh[32 * n + l] |= static_cast<uint8_t>((L[i] >> 4) << (2 * quarter));
    }
    for (int j = 0; j < QK_K / 16; ++j) b.scales[j] = static_cast<int8_t>(sc[j]);
    b.d = d;
  }
};

// ------------------------------------------------------------------------------------------
// Super-block encoders.

// The fp16 bits of a super-block scale d = v / steps and its decoded value (returned).
inline float super_scale(float v, int steps, uint16_t& h) {
  h = half_finite(v / static_cast<float>(steps));
  return half_to_float(h);
}

// v / d rounded and clamped to [lo, hi] (lo for d == 0 or NaN).
inline int quantize_scale(float v, float d, int lo, int hi) {
  return static_cast<int>(clampf(round_nearest(d != 0.0f ? v / d : 0.0f), lo, hi));
}

// Asymmetric K-quant super-block (Q2_K, Q4_K, Q5_K).
template <class F, class E>
void encode_asym(const float* x, typename F::Block& b) {
  constexpr int SUB = F::SUB, NS = QK_K / SUB;
  float a[NS], m[NS], amax = 0.0f, mmax = 0.0f;
  for (int j = 0; j < NS; ++j) {
    fit_scale_min<SUB, E::NL>(x + j * SUB, E::grid, a[j], m[j]);
    amax = std::max(amax, a[j]);
    mmax = std::max(mmax, m[j]);
  }
  uint16_t dh, dminh;
  const float d = super_scale(amax, E::SMAX, dh), dmin = super_scale(mmax, E::SMAX, dminh);
  int sc[NS], mn[NS];
  uint8_t L[QK_K];
  for (int j = 0; j < NS; ++j) {
    const float* xs = x + j * SUB;
    const int s0 = quantize_scale(a[j], d, 0, E::SMAX), m0 = quantize_scale(m[j], dmin, 0, E::SMAX);
    float best = INFINITY;
    sc[j] = s0;
    mn[j] = m0;
    for (int s = std::max(s0 - E::R, 0); s <= std::min(s0 + E::R, E::SMAX); ++s)
      for (int t = std::max(m0 - E::R, 0); t <= std::min(m0 + E::R, E::SMAX); ++t) {
        const float err = requant_error<SUB, 0, E::NL>(xs, mul_rn(d, static_cast<float>(s)),
                                                       mul_rn(dmin, static_cast<float>(t)));
        if (err < best) {
          best = err;
          sc[j] = s;
          mn[j] = t;
        }
      }
    requant_codes<SUB, 0, E::NL>(xs, mul_rn(d, static_cast<float>(sc[j])),
                                 mul_rn(dmin, static_cast<float>(mn[j])), L + j * SUB);
  }
  E::pack(b, L, sc, mn, dh, dminh);
}

// Symmetric K-quant super-block (Q3_K, Q6_K). An all-zero super-block encodes to zero bytes.
template <class F, class E>
void encode_sym(const float* x, typename F::Block& b) {
  constexpr int SUB = F::SUB, NS = QK_K / SUB, SLO = -E::SMAX - 1;
  float a[NS], amax = 0.0f;
  for (int j = 0; j < NS; ++j) {
    a[j] = fit_scale<SUB, E::NL>(x + j * SUB, E::grid);
    if (std::fabs(a[j]) > std::fabs(amax)) amax = a[j];
  }
  // The largest-magnitude scale maps to the extra negative step, -(SMAX + 1).
  uint16_t dh;
  const float d = super_scale(-amax, E::SMAX + 1, dh);
  if (d == 0.0f) {
    std::memset(&b, 0, sizeof b);
    return;
  }
  int sc[NS];
  uint8_t L[QK_K];
  for (int j = 0; j < NS; ++j) {
    const float* xs = x + j * SUB;
    const int s0 = quantize_scale(a[j], d, SLO, E::SMAX);
    float best = INFINITY;
    sc[j] = s0;
    for (int s = std::max(s0 - E::R, SLO); s <= std::min(s0 + E::R, E::SMAX); ++s) {
      const float err =
          requant_error<SUB, -E::NL, E::NL - 1>(xs, mul_rn(d, static_cast<float>(s)), 0.0f);
      if (err < best) {
        best = err;
        sc[j] = s;
      }
    }
    requant_codes<SUB, -E::NL, E::NL - 1>(xs, mul_rn(d, static_cast<float>(sc[j])), 0.0f,
                                          L + j * SUB);
  }
  E::pack(b, L, sc, dh);
}

// Encode one super-block of format F.
template <class F>
void encode_block(const float* x, typename F::Block& b) {
  using E = Encoder<F::type>;
  if constexpr (E::ASYM)
    encode_asym<F, E>(x, b);
  else
    encode_sym<F, E>(x, b);
}

}  // namespace

void quantize_row(GGMLType t, const float* src, int64_t k, void* dst) {
  dispatch_format(t, [&](auto f) {
    using F = decltype(f);
    auto* blocks = static_cast<typename F::Block*>(dst);
    const int64_t nb = k / F::QK;
    for (int64_t i = 0; i < nb; ++i) {
      if constexpr (F::type == GGMLType::Q8_0)
        quantize_q8_0(src + i * F::QK, blocks[i]);
      else
        encode_block<F>(src + i * F::QK, blocks[i]);
    }
  });
}

}  // namespace jax_moe
