// Host quantizers for the GGUF block formats (docs/contract.md §3).
//
// Q8_0 and MXFP4 reproduce gguf.quants.quantize (for Q8_0 also ggml's reference) bit for bit. The
// K-quants work in three steps per super-block:
//   1. fit a scale (and min) to every sub-block: unweighted least squares (the measure the
//      quantizers are judged by) over a grid of candidate scales and level shifts, polished by
//      requantizing and refitting;
//   2. derive the fp16 super-block scale(s) from the largest fitted scale (and min);
//   3. for every sub-block, try a few integer scales (and mins) around the rounded fit and keep
//      the one whose requantized values, decoded exactly as Format<T> decodes them, have the
//      least squared error.
// The hot loops evaluate all candidates at once with the candidate index innermost, so the
// compiler vectorizes them without reassociating any sum. Every float -> int conversion goes
// through nearest_int (defined for any input) or a clamped value, so NaN and infinite inputs give
// some output and never undefined behaviour; fp16 scales are always finite. Must not be built
// with -ffast-math (nearest_int and Q8_0's exactness rely on IEEE arithmetic).
#include "quantize.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "../common/gguf_formats.h"

namespace jax_moe {
namespace {

constexpr float kHalfMax = 65504.0f;  // largest finite fp16

// Nearest integer of v (ties to even) for |v| < 2^22, by the 1.5 * 2^23 trick. Any other input
// (huge, infinite, NaN) gives some int in [-2^22, 2^22) and no undefined behaviour.
inline int nearest_int(float v) {
  const float t = v + 12582912.0f;
  int32_t i;
  std::memcpy(&i, &t, sizeof i);
  return (i & 0x007fffff) - 0x00400000;
}

// The integer nearest v clamped to [lo, hi], as a float. Clamping in integers keeps the loops
// that use it free of floating-point branches, which the compiler would not vectorize.
inline float level(float v, int lo, int hi) {
  return static_cast<float>(std::min(std::max(nearest_int(v), lo), hi));
}

// As level, for v >= -0.5 (or NaN, which yields some value): only the upper clamp.
inline float level_up_to(float v, int hi) { return static_cast<float>(std::min(nearest_int(v), hi)); }

// fp16 bits of a super-block scale, forced finite: NaN becomes 0, magnitudes clamp to 65504.
inline uint16_t half_finite(float v) {
  if (!(v == v)) return 0;
  return float_to_half(std::min(std::max(v, -kHalfMax), kHalfMax));
}

// ------------------------------------------------------------------------------------------
// Q8_0: ggml's reference, bit for bit.

// roundf (half away from zero) of v for |v| <= 127; larger finite values saturate at +-127 and
// NaN or infinity (x / d for a d near 0) give 0, as numpy's cast does on x86. v is only
// compared, never added to, so no fused multiply-add can absorb its rounding.
inline int round_away_q8(float v) {
  if (!(std::fabs(v) <= 127.0f)) return std::isfinite(v) ? (v > 0.0f ? 127 : -127) : 0;
  const int t = static_cast<int>(v);  // truncation toward zero
  const float ft = static_cast<float>(t);
  return t + (v >= ft + 0.5f ? 1 : 0) - (v <= ft - 0.5f ? 1 : 0);
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
// MXFP4: gguf.quants' quantizer (gguf-py 0.19, MXFP4.quantize_blocks), bit for bit, on every
// input (NaN and Inf included, as numpy computes them on x86):
//   d = max|x| (NaN if any x is NaN);  e = uint8(floor(log2(d)) - 2 + 127) where d > 0, else 0;
//   each x takes the first of the 16 kvalues q minimizing |e8m0_half(e) * q - x| in f32 (NaN
//   errors count as the minimum, as numpy's argmin has it).
// numpy's float32 log2 is correctly rounded at the powers of two (where floor() is decided), so
// log2 runs in double and is rounded to float once; the float -> uint8 cast goes through int32 as
// numpy's does on x86 (d < 2^-125 wraps around, d = Inf gives 0).

constexpr int8_t kMxfp4Values[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

// Index of the first smallest |d * q - x| over the kvalues (the first NaN, if any).
inline int mxfp4_nearest(float x, float d) {
  int best = 0;
  float best_err = INFINITY;
  for (int c = 0; c < 16; ++c) {
    const float err = std::fabs(d * static_cast<float>(kMxfp4Values[c]) - x);
    if (err != err) return c;
    if (c == 0 || err < best_err) {
      best = c;
      best_err = err;
    }
  }
  return best;
}

void quantize_mxfp4(const float* x, block_mxfp4& b) {
  float amax = 0.0f;
  bool nan = false;
  for (int i = 0; i < QK_MXFP4; ++i) {
    const float a = std::fabs(x[i]);
    if (a != a) nan = true;
    amax = std::max(amax, a);
  }
  uint8_t e = 0;
  if (!nan && amax > 0.0f) {
    const float v = std::floor(static_cast<float>(std::log2(static_cast<double>(amax)))) - 2.0f + 127.0f;
    e = std::isfinite(v) ? static_cast<uint8_t>(static_cast<int>(v)) : 0;  // v in [-24, 253]
  }
  b.e = e;
  const float d = e8m0_half(e);
  for (int j = 0; j < QK_MXFP4 / 2; ++j)
    b.qs[j] = static_cast<uint8_t>(mxfp4_nearest(x[j], d) | (mxfp4_nearest(x[j + QK_MXFP4 / 2], d) << 4));
}

// ------------------------------------------------------------------------------------------
// Sub-block fits: plain (unweighted) least squares, the measure the quantizers are judged by.

// The candidates of a fit: `offsets` shifts of the level grid (spread evenly over one level)
// for each inverse scale (top level + first + step * k) / span, k = 0, 1, ...
struct Grid {
  float first, step;
  int offsets;
};

// Inverse scale (before dividing by the span) and level shift of candidate c of `grid`.
inline void grid_candidate(const Grid& grid, int top, int c, float& iscale, float& shift) {
  iscale = static_cast<float>(top) + grid.first + grid.step * static_cast<float>(c / grid.offsets);
  shift = (static_cast<float>(c % grid.offsets) + 0.5f) / static_cast<float>(grid.offsets) - 0.5f;
}

// Least-squares x ~ a*l + b with b <= 0 from the sums over n elements of x, x^2, l, l^2, x*l.
// Returns the squared error (sxx - a*sxl - b*sx at the optimum), or infinity when the levels
// cannot carry a positive scale.
inline float solve_scale_min(float n, float sx, float sxx, float sl, float sll, float sxl,
                             float& a, float& b) {
  const float det = n * sll - sl * sl;  // 0 when all levels are equal
  a = b = 0.0f;
  if (det > 0.0f) {
    const float inv = 1.0f / det;
    a = (n * sxl - sx * sl) * inv;
    b = (sll * sx - sl * sxl) * inv;
  }
  if (!(det > 0.0f) || b > 0.0f) {  // b must not be positive: fit through the origin
    b = 0.0f;
    a = sll > 0.0f ? sxl / sll : 0.0f;
  }
  return a > 0.0f ? sxx - a * sxl - b * sx : INFINITY;
}

// Fit x ~ a*l - m with integer l in [0, NL], a > 0 and m >= 0 (the range always covers 0, as the
// K-quants subtract their mins). Each of the C candidates of `grid` quantizes the sub-block from
// its minimum with its inverse scale and shift, the least-squares (a, m) for those levels is
// solved in closed form, and the best is polished by requantizing with it and refitting. A
// constant sub-block gives a = 0 and m = -min(x, 0).
template <int N, int NL, int C>
void fit_scale_min(const float* x, Grid grid, float& a, float& m) {
  float lo = x[0], hi = x[0], sx = 0.0f, sxx = 0.0f;
  for (int i = 0; i < N; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
    sx += x[i];
    sxx += x[i] * x[i];
  }
  lo = std::min(lo, 0.0f);
  a = 0.0f;
  m = -lo;
  if (!(hi > lo)) return;
  float is[C], sh[C], sl[C] = {}, sll[C] = {}, sxl[C] = {};
  for (int c = 0; c < C; ++c) {
    grid_candidate(grid, NL, c, is[c], sh[c]);
    is[c] /= hi - lo;
  }
  for (int i = 0; i < N; ++i) {
    const float xi = x[i], u = x[i] - lo;
    for (int c = 0; c < C; ++c) {
      const float l = level_up_to(is[c] * u + sh[c], NL);  // is * u >= 0, sh >= -0.5
      sl[c] += l;
      sll[c] += l * l;
      sxl[c] += xi * l;
    }
  }
  float best = INFINITY, ba = 0.0f, bb = 0.0f;
  for (int c = 0; c < C; ++c) {
    float ca, cb;
    const float err = solve_scale_min(N, sx, sxx, sl[c], sll[c], sxl[c], ca, cb);
    if (err < best) {
      best = err;
      ba = ca;
      bb = cb;
    }
  }
  for (int it = 0; it < 2 && ba > 0.0f; ++it) {
    const float ia = 1.0f / ba;
    float tl = 0.0f, tll = 0.0f, txl = 0.0f, ca, cb;
    for (int i = 0; i < N; ++i) {
      const float l = level((x[i] - bb) * ia, 0, NL);
      tl += l;
      tll += l * l;
      txl += x[i] * l;
    }
    const float err = solve_scale_min(N, sx, sxx, tl, tll, txl, ca, cb);
    if (!(err < best)) break;
    best = err;
    ba = ca;
    bb = cb;
  }
  if (ba > 0.0f) {
    a = ba;
    m = -bb;
  }
}

// Fit x ~ a*l with integer l in [-NL, NL - 1] by least squares, i.e. maximizing
// (sum x l)^2 / sum l^2. The C candidates of `grid` map the largest-magnitude value to about -NL
// (so it can use the extra negative level); the best is polished by requantizing and refitting.
// Returns a (0 for an all-zero x).
template <int N, int NL, int C>
float fit_scale(const float* x, Grid grid) {
  float vmax = 0.0f;
  for (int i = 0; i < N; ++i)
    if (std::fabs(x[i]) > std::fabs(vmax)) vmax = x[i];
  if (vmax == 0.0f) return 0.0f;
  float is[C], sh[C], sll[C] = {}, sxl[C] = {};
  for (int c = 0; c < C; ++c) {
    grid_candidate(grid, NL, c, is[c], sh[c]);
    is[c] /= -vmax;
  }
  for (int i = 0; i < N; ++i) {
    const float xi = x[i];
    for (int c = 0; c < C; ++c) {
      const float l = level(is[c] * xi + sh[c], -NL, NL - 1);
      sll[c] += l * l;
      sxl[c] += xi * l;
    }
  }
  float best = 0.0f, ba = 0.0f;  // best = (sum x l)^2 / sum l^2, to maximize
  for (int c = 0; c < C; ++c)
    if (sll[c] > 0.0f && sxl[c] * sxl[c] / sll[c] > best) {
      best = sxl[c] * sxl[c] / sll[c];
      ba = sxl[c] / sll[c];
    }
  for (int it = 0; it < 2 && ba != 0.0f; ++it) {
    const float ia = 1.0f / ba;
    float tll = 0.0f, txl = 0.0f;
    for (int i = 0; i < N; ++i) {
      const float l = level(x[i] * ia, -NL, NL - 1);
      tll += l * l;
      txl += x[i] * l;
    }
    if (!(tll > 0.0f && txl * txl / tll > best)) break;
    best = txl * txl / tll;
    ba = txl / tll;
  }
  return ba;
}

// ------------------------------------------------------------------------------------------
// Requantization against the decoder's scales: element x decodes as a * l - m (m = 0 for the
// symmetric formats), l the level nearest (x + m) / a in [LO, HI].

// Squared errors err[c] of the sub-block requantized with each candidate (a[c], m[c]).
template <int N, int C, int LO, int HI>
void candidate_errors(const float* x, const float* a, const float* m, float* err) {
  float ia[C];
  for (int c = 0; c < C; ++c) {
    ia[c] = a[c] != 0.0f ? 1.0f / a[c] : 0.0f;
    err[c] = 0.0f;
  }
  for (int i = 0; i < N; ++i) {
    const float xi = x[i];
    for (int c = 0; c < C; ++c) {
      const float e = sub_rn(mul_rn(a[c], level((xi + m[c]) * ia[c], LO, HI)), m[c]) - xi;
      err[c] += e * e;
    }
  }
}

// Index of the smallest of err[0..C) (0 if none is a number).
template <int C>
int argmin(const float* err) {
  int best = 0;
  for (int c = 1; c < C; ++c)
    if (err[c] < err[best] || !(err[best] == err[best])) best = c;
  return best;
}

// Codes (level - LO) of the sub-block requantized with scale a and min m.
template <int N, int LO, int HI>
void requant_codes(const float* x, float a, float m, uint8_t* codes) {
  const float ia = a != 0.0f ? 1.0f / a : 0.0f;
  for (int i = 0; i < N; ++i)
    codes[i] = static_cast<uint8_t>(std::min(std::max(nearest_int((x[i] + m) * ia), LO), HI) - LO);
}

// v / d rounded to an integer and clamped to [lo, hi] (0 clamped for d == 0).
inline int quantize_scale(float v, float d, int lo, int hi) {
  return std::min(std::max(nearest_int(d != 0.0f ? v / d : 0.0f), lo), hi);
}

// ------------------------------------------------------------------------------------------
// Per-format encoder parameters and bit packing (the inverse of Format<T>::quant/scale_min).
// Asymmetric formats: levels 0..NL, integer scales and mins 0..SMAX. Symmetric formats: levels
// -NL..NL-1 (stored as level + NL), integer scales -SMAX-1..SMAX. GRID candidates of `grid` for
// the fits; the integer search tries the first SEARCH moves of kMoves (asymmetric: (scale, min)
// steps) or kSteps (symmetric: scale steps) from the rounded fit.

// Moves of the integer (scale, min) search, the likelier first: a larger scale with a larger
// min keeps the sub-block centred, so the diagonal moves come before the anti-diagonal.
constexpr int kMoves[][2] = {{0, 0}, {-1, 0}, {1, 0}, {0, -1}, {0, 1},
                             {-1, -1}, {1, 1}, {1, -1}, {-1, 1}};
constexpr int kSteps[] = {0, -1, 1, -2, 2, -3, 3, -4, 4};

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
  static constexpr int NL = 3, SMAX = 15, GRID = 16, SEARCH = 8;
  static constexpr Grid grid{-0.5f, 0.25f, 4};
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
  static constexpr int NL = 15, SMAX = 63, GRID = 16, SEARCH = 8;
  static constexpr Grid grid{-1.0f, 0.5f, 4};
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
  static constexpr int NL = 31, SMAX = 63, GRID = 24, SEARCH = 8;
  static constexpr Grid grid{-1.5f, 0.5f, 4};
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
  static constexpr int NL = 4, SMAX = 31, GRID = 20, SEARCH = 4;
  static constexpr Grid grid{-0.9f, 0.1f, 1};
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
  static constexpr int NL = 32, SMAX = 127, GRID = 24, SEARCH = 4;
  static constexpr Grid grid{-6.0f, 0.5f, 1};
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

// fp16 bits of the super-block scale v / steps, and (in d) its value as the decoder reads it.
// A nonzero v too small for fp16 gets the smallest subnormal rather than 0, so that the integer
// scales still have something to multiply (the search then picks 0 where that is better).
inline uint16_t super_scale(float v, int steps, float& d) {
  uint16_t h = half_finite(v / static_cast<float>(steps));
  if ((h & 0x7fffu) == 0 && v != 0.0f && v == v) h |= 1u;
  d = half_to_float(h);
  return h;
}

// Asymmetric K-quant super-block (Q2_K, Q4_K, Q5_K).
template <class F, class E>
void encode_asym(const float* x, typename F::Block& b) {
  constexpr int SUB = F::SUB, NS = QK_K / SUB, C = E::SEARCH;
  float a[NS], m[NS], amax = 0.0f, mmax = 0.0f;
  for (int j = 0; j < NS; ++j) {
    fit_scale_min<SUB, E::NL, E::GRID>(x + j * SUB, E::grid, a[j], m[j]);
    amax = std::max(amax, a[j]);
    mmax = std::max(mmax, m[j]);
  }
  float d, dmin;
  const uint16_t dh = super_scale(amax, E::SMAX, d), dminh = super_scale(mmax, E::SMAX, dmin);
  int sc[NS], mn[NS];
  uint8_t L[QK_K];
  for (int j = 0; j < NS; ++j) {
    const float* xs = x + j * SUB;
    const int s0 = quantize_scale(a[j], d, 0, E::SMAX), m0 = quantize_scale(m[j], dmin, 0, E::SMAX);
    int cs[C], cm[C];
    float ca[C], cmin[C], err[C];
    for (int c = 0; c < C; ++c) {
      cs[c] = std::min(std::max(s0 + kMoves[c][0], 0), E::SMAX);
      cm[c] = std::min(std::max(m0 + kMoves[c][1], 0), E::SMAX);
      ca[c] = mul_rn(d, static_cast<float>(cs[c]));
      cmin[c] = mul_rn(dmin, static_cast<float>(cm[c]));
    }
    candidate_errors<SUB, C, 0, E::NL>(xs, ca, cmin, err);
    const int c = argmin<C>(err);
    sc[j] = cs[c];
    mn[j] = cm[c];
    requant_codes<SUB, 0, E::NL>(xs, ca[c], cmin[c], L + j * SUB);
  }
  E::pack(b, L, sc, mn, dh, dminh);
}

// Symmetric K-quant super-block (Q3_K, Q6_K). An all-zero super-block encodes to zero bytes.
template <class F, class E>
void encode_sym(const float* x, typename F::Block& b) {
  constexpr int SUB = F::SUB, NS = QK_K / SUB, SLO = -E::SMAX - 1, C = E::SEARCH;
  float a[NS], amax = 0.0f;
  for (int j = 0; j < NS; ++j) {
    a[j] = fit_scale<SUB, E::NL, E::GRID>(x + j * SUB, E::grid);
    if (std::fabs(a[j]) > std::fabs(amax)) amax = a[j];
  }
  // The largest-magnitude scale maps to the extra negative step, -(SMAX + 1).
  float d;
  const uint16_t dh = super_scale(-amax, E::SMAX + 1, d);
  if (d == 0.0f) {
    std::memset(&b, 0, sizeof b);
    return;
  }
  int sc[NS];
  uint8_t L[QK_K];
  for (int j = 0; j < NS; ++j) {
    const float* xs = x + j * SUB;
    const int s0 = quantize_scale(a[j], d, SLO, E::SMAX);
    int cs[C];
    float ca[C], zero[C] = {}, err[C];
    for (int c = 0; c < C; ++c) {
      cs[c] = std::min(std::max(s0 + kSteps[c], SLO), E::SMAX);
      ca[c] = mul_rn(d, static_cast<float>(cs[c]));
    }
    candidate_errors<SUB, C, -E::NL, E::NL - 1>(xs, ca, zero, err);
    const int c = argmin<C>(err);
    sc[j] = cs[c];
    requant_codes<SUB, -E::NL, E::NL - 1>(xs, ca[c], 0.0f, L + j * SUB);
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
      else if constexpr (F::type == GGMLType::MXFP4)
        quantize_mxfp4(src + i * F::QK, blocks[i]);
      else
        encode_block<F>(src + i * F::QK, blocks[i]);
    }
  });
}

}  // namespace jax_moe
