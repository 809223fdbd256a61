// C++ tests of the host GGUF codecs (csrc/cpu/codec.cc, quantize.cc), SCALAR_GGUF's q8_1
// staging and integer dot products (csrc/common/q8_1.h), the CPU kernel (csrc/cpu/moe_cpu.cc) and
// the plain-C++ parts of the CUDA kernels (the MXFP4 GEMV lanes, the GEMMs' rasterization),
// built with -fsanitize=address,undefined when JAX_MOE_SANITIZE=ON (tests/cpp/CMakeLists.txt).
//
// Every buffer handed to the code under test is a std::vector of exactly the size its shape
// implies, so AddressSanitizer reports any byte read or written outside it; UBSan reports
// undefined float -> int conversions, shifts, overflows and divisions. Inputs include NaN, Inf,
// FLT_MAX, subnormals, random bytes (NaN/Inf fp16 scales) and expert ids anywhere in int32.
// Exit status: 0 when every check passed.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "../../csrc/common/fp16.h"
#include "../../csrc/common/gguf_formats.h"
#include "../../csrc/common/moe_problem.h"
#include "../../csrc/common/q8_1.h"
#include "../../csrc/cpu/codec.h"
#include "../../csrc/cpu/moe_cpu.h"
#include "../../csrc/cuda/raster.h"

using namespace jax_moe;

namespace {

int g_checks = 0, g_failures = 0;

#define CHECK(cond, ...)                                                           \
  do {                                                                             \
    ++g_checks;                                                                    \
    if (!(cond)) {                                                                 \
      ++g_failures;                                                                \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                           \
      std::fprintf(stderr, "\n");                                                  \
    }                                                                              \
  } while (0)

constexpr GGMLType kFormats[] = {GGMLType::Q8_0, GGMLType::Q2_K, GGMLType::Q3_K, GGMLType::Q4_K,
                                 GGMLType::Q5_K, GGMLType::Q6_K, GGMLType::MXFP4};
constexpr int32_t kI32Min = std::numeric_limits<int32_t>::min();
constexpr int32_t kI32Max = std::numeric_limits<int32_t>::max();

int64_t row_bytes(GGMLType t, int64_t k) { return k / block_elems(t) * block_bytes(t); }

// Relative RMS error bounds of a round trip on N(0, 1) data (loose: a smoke test, not quality).
double rms_bound(GGMLType t) {
  switch (t) {
    case GGMLType::Q8_0: return 0.01;
    case GGMLType::Q6_K: return 0.03;
    case GGMLType::Q5_K: return 0.06;
    case GGMLType::Q4_K: return 0.12;
    case GGMLType::Q3_K: return 0.25;
    case GGMLType::MXFP4: return 0.15;
    default: return 0.4;
  }
}

template <class Fn>
bool throws_invalid_argument(Fn&& fn) {
  try {
    fn();
  } catch (const std::invalid_argument&) {
    return true;
  } catch (...) {
    return false;
  }
  return false;
}

// -- codecs ---------------------------------------------------------------------------------

void test_round_trip(std::mt19937_64& gen) {
  std::normal_distribution<float> normal;
  for (GGMLType t : kFormats) {
    const int qk = block_elems(t);
    for (int64_t rows : {0, 1, 3, 7}) {
      for (int64_t nb : {0, 1, 2, 5}) {
        const int64_t k = nb * qk;
        std::vector<float> src(static_cast<size_t>(rows * k)), back(src.size());
        for (float& v : src) v = normal(gen);
        std::vector<uint8_t> q(static_cast<size_t>(rows * row_bytes(t, k)));
        quantize_rows(t, src.data(), rows, k, q.data());
        dequantize_rows(t, q.data(), rows, k, back.data());
        double err = 0, ref = 0;
        for (size_t i = 0; i < src.size(); ++i) {
          err += (double(back[i]) - src[i]) * (double(back[i]) - src[i]);
          ref += double(src[i]) * src[i];
        }
        if (!src.empty())
          CHECK(std::sqrt(err / ref) <= rms_bound(t), "%s rows=%lld k=%lld rms=%g", type_name(t),
                (long long)rows, (long long)k, std::sqrt(err / ref));
      }
    }
  }
}

// NaN, Inf, FLT_MAX, subnormals, signed zeros: quantizing is defined (UBSan: no bad float->int
// conversion) and the fp16 scales it writes are finite, so every decoded value is finite.
void test_hostile_values(std::mt19937_64& gen) {
  const float specials[] = {NAN, -NAN, INFINITY, -INFINITY, FLT_MAX, -FLT_MAX, FLT_MIN, -FLT_MIN,
                            1e-45f, -1e-45f, 0.0f, -0.0f, 65504.0f, 65520.0f, 1e30f, -1e-30f};
  std::uniform_int_distribution<int> pick(0, int(sizeof(specials) / sizeof(float)) - 1);
  std::uniform_real_distribution<float> coin(0.0f, 1.0f);
  std::normal_distribution<float> normal;
  for (GGMLType t : kFormats) {
    const int64_t rows = 16, k = 2 * QK_K;
    for (float density : {0.01f, 0.3f, 1.0f}) {
      std::vector<float> src(static_cast<size_t>(rows * k)), back(src.size());
      for (float& v : src) v = coin(gen) < density ? specials[pick(gen)] : normal(gen) * 1e-3f;
      std::vector<uint8_t> q(static_cast<size_t>(rows * row_bytes(t, k)));
      quantize_rows(t, src.data(), rows, k, q.data());
      dequantize_rows(t, q.data(), rows, k, back.data());
      size_t nonfinite = 0;
      for (float v : back) nonfinite += !std::isfinite(v);
      CHECK(nonfinite == 0, "%s density=%g: %zu decoded values are not finite", type_name(t), density, nonfinite);
    }
    // A constant block of the largest finite value, and blocks of one value each.
    for (float c : {FLT_MAX, -FLT_MAX, 65504.0f, 1e-45f, 0.0f}) {
      std::vector<float> src(static_cast<size_t>(QK_K), c), back(src.size());
      std::vector<uint8_t> q(static_cast<size_t>(row_bytes(t, QK_K)));
      quantize_rows(t, src.data(), 1, QK_K, q.data());
      dequantize_rows(t, q.data(), 1, QK_K, back.data());
      for (float v : back) CHECK(std::isfinite(v), "%s constant %g decodes to %g", type_name(t), c, v);
    }
  }
}

// Random bytes (any fp16 scale: NaN, Inf, subnormal) decode without any sanitizer report; blocks
// whose scale fields are finite decode to finite values.
void test_random_bytes(std::mt19937_64& gen) {
  std::uniform_int_distribution<int> byte(0, 255);
  for (GGMLType t : kFormats) {
    const int64_t rows = 5, nb = 3, k = nb * block_elems(t);
    std::vector<uint8_t> q(static_cast<size_t>(rows * row_bytes(t, k)));
    for (auto& b : q) b = static_cast<uint8_t>(byte(gen));
    std::vector<float> out(static_cast<size_t>(rows * k));
    dequantize_rows(t, q.data(), rows, k, out.data());
    CHECK(out.size() == size_t(rows * k), "size");
  }
}

// Every size the codecs are given is checked: an unsupported type, a K that is not a block
// multiple, negative or overflowing counts are std::invalid_argument, and nothing is written.
void test_bad_arguments() {
  std::vector<float> f(64, 1.0f);
  std::vector<uint8_t> q(64, 0xAB);
  const GGMLType bad_types[] = {GGMLType::F32, GGMLType::F16, GGMLType::BF16, static_cast<GGMLType>(2),
                                static_cast<GGMLType>(7), static_cast<GGMLType>(-1),
                                static_cast<GGMLType>(999)};
  for (GGMLType t : bad_types) {
    CHECK(throws_invalid_argument([&] { quantize_rows(t, f.data(), 1, 32, q.data()); }),
          "quantize_rows accepted type %d", int(t));
    CHECK(throws_invalid_argument([&] { dequantize_rows(t, q.data(), 1, 32, f.data()); }),
          "dequantize_rows accepted type %d", int(t));
  }
  for (GGMLType t : kFormats) {
    const int64_t qk = block_elems(t);
    for (int64_t k : {int64_t{1}, qk - 1, qk + 1, qk * 3 + 7, int64_t{-1} * qk}) {
      CHECK(throws_invalid_argument([&] { quantize_rows(t, f.data(), 1, k, q.data()); }),
            "quantize_rows %s accepted k=%lld", type_name(t), (long long)k);
      CHECK(throws_invalid_argument([&] { dequantize_rows(t, q.data(), 1, k, f.data()); }),
            "dequantize_rows %s accepted k=%lld", type_name(t), (long long)k);
    }
    CHECK(throws_invalid_argument([&] { quantize_rows(t, f.data(), -1, qk, q.data()); }), "rows=-1");
    CHECK(throws_invalid_argument([&] { dequantize_rows(t, q.data(), -1, qk, f.data()); }), "rows=-1");
    const int64_t huge = int64_t{1} << 40;
    CHECK(throws_invalid_argument([&] { quantize_rows(t, f.data(), huge, huge / qk * qk, q.data()); }),
          "rows * k overflow");
    CHECK(throws_invalid_argument([&] { dequantize_rows(t, q.data(), huge, huge / qk * qk, f.data()); }),
          "rows * k overflow");
    CHECK(throws_invalid_argument([&] { quantize_rows(t, nullptr, 1, qk, q.data()); }), "null src");
    CHECK(throws_invalid_argument([&] { dequantize_rows(t, q.data(), 1, qk, nullptr); }), "null dst");
    // Empty work needs no buffers.
    quantize_rows(t, nullptr, 0, qk, nullptr);
    dequantize_rows(t, nullptr, 3, 0, nullptr);
  }
  for (uint8_t b : q) CHECK(b == 0xAB, "a rejected call wrote to its output");
}

// MXFP4's integer view: every code through quant8 is ggml's kvalues_mxfp4, element j in the low
// nibble of qs[j] and element j + 16 in the high one; scale 2^(e - 128) for every exponent.
void test_mxfp4_trait(std::mt19937_64& gen) {
  using F = Format<GGMLType::MXFP4>;
  const int kvalues[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
  std::uniform_int_distribution<int> code(0, 15);
  for (int trial = 0; trial < 64; ++trial) {
    block_mxfp4 b;
    int c[QK_MXFP4];
    for (int& v : c) v = code(gen);
    if (trial < 16)
      for (int j = 0; j < QK_MXFP4; ++j) c[j] = (j + trial) % 16;  // every code at every position
    b.e = static_cast<uint8_t>(trial * 4 + 1);
    for (int j = 0; j < QK_MXFP4 / 2; ++j) b.qs[j] = static_cast<uint8_t>(c[j] | (c[j + 16] << 4));
    for (int i0 = 0; i0 < QK_MXFP4; i0 += 8) {
      int q[8];
      unpack8(F::quant8(b, i0), q);
      for (int t = 0; t < 8; ++t)
        CHECK(q[t] == kvalues[c[i0 + t]], "MXFP4 element %d: code %d gives %d", i0 + t, c[i0 + t], q[t]);
    }
  }
  for (int e = 0; e < 256; ++e) {
    block_mxfp4 b{};
    b.e = static_cast<uint8_t>(e);
    float a, m;
    F::scale_min(b, 0, a, m);
    CHECK(a == std::ldexp(1.0f, e - 128) && m == 0.0f, "MXFP4 e=%d: scale %g", e, a);
  }
}

// -- SCALAR_GGUF staging and integer dot products --------------------------------------------

// The tensor-core GEMV's MXFP4 lanes (mma_gemv.cuh Mxfp4Tile): from the five aligned 8-byte
// words each lane loads, the scales and quants of its two blocks equal the block trait's.
void test_mxfp4_gemv_lanes(std::mt19937_64& gen) {
  using F = Format<GGMLType::MXFP4>;
  static_assert(sizeof(block_mxfp4) == 17, "17-byte blocks");
  for (int trial = 0; trial < 200; ++trial) {
    alignas(8) uint8_t chunk[136];
    for (auto& b : chunk) b = static_cast<uint8_t>(gen());
    const auto* blocks = reinterpret_cast<const block_mxfp4*>(chunk);
    for (int c = 0; c < 4; ++c) {
      const int base = (34 * c) & ~7;
      CHECK(base + 40 <= 136, "lane %d reads past the chunk\n", c);
      uint32_t w[10];
      std::memcpy(w, chunk + base, sizeof(w));
      const Mxfp4Lane l = mxfp4_lane(w, c);
      CHECK(l.ea == blocks[2 * c].e && l.eb == blocks[2 * c + 1].e, "lane %d scales\n", c);
      for (int g = 0; g < 4; ++g) {
        CHECK(mxfp4_group8(l.qa, g) == F::quant8(blocks[2 * c], 8 * g), "lane %d block a group %d\n", c, g);
        CHECK(mxfp4_group8(l.qb, g) == F::quant8(blocks[2 * c + 1], 8 * g), "lane %d block b group %d\n", c, g);
      }
    }
  }
}

// The same lanes over whole MXFP4 rows where K % 256 != 0 (gpt-oss's K = 2880: 1530-byte rows on
// 2-byte boundaries, a last chunk of 64 elements): for every row, chunk and lane that holds
// elements, the words at mxfp4_lane_addr give mxfp4_lane the lane's two blocks, and those words
// lie inside the rows' bytes.
void test_mxfp4_gemv_rows(std::mt19937_64& gen) {
  using F = Format<GGMLType::MXFP4>;
  for (int K : {2880, 320, 448, 512}) {
    const int nb = K / 32, row_bytes = nb * 17, rows = 7;
    std::vector<uint64_t> store((rows * row_bytes + 7) / 8);  // 8-byte aligned, as the kernel's w
    auto* bytes = reinterpret_cast<uint8_t*>(store.data());
    for (int i = 0; i < rows * row_bytes; ++i) bytes[i] = static_cast<uint8_t>(gen());
    const uint8_t* end = bytes + rows * row_bytes;
    for (int r = 0; r < rows; ++r) {
      const uint8_t* row = bytes + r * row_bytes;
      const auto* blocks = reinterpret_cast<const block_mxfp4*>(row);
      for (int ch = 0; ch * 256 < K; ++ch) {
        for (int c = 0; c < 4 && ch * 256 + 64 * c < K; ++c) {
          const Mxfp4LaneAddr at = mxfp4_lane_addr(row, ch, c);
          const uint8_t* lane = row + ch * 136 + 34 * c;
          CHECK(reinterpret_cast<uintptr_t>(at.words) % 8 == 0 && at.words + 2 * at.at == lane,
                "K %d row %d chunk %d lane %d: words at the boundary below the lane's bytes\n", K, r, ch, c);
          // The five words cover the lane's 34 bytes and end with the 8-byte word holding its last byte.
          const uintptr_t last_word_end = ((reinterpret_cast<uintptr_t>(lane + 33)) | 7u) + 1;
          CHECK(lane + 34 <= at.words + 40 && reinterpret_cast<uintptr_t>(at.words + 40) == last_word_end,
                "K %d row %d chunk %d lane %d: five words, ending in the word of the lane's last byte\n", K, r, ch, c);
          uint32_t w[10] = {};
          const size_t n = static_cast<size_t>(std::min<ptrdiff_t>(40, end - at.words));
          std::memcpy(w, at.words, n);
          const Mxfp4Lane l = mxfp4_lane(w, at.at);
          const int b0 = ch * 8 + 2 * c;
          CHECK(l.ea == blocks[b0].e && l.eb == blocks[b0 + 1].e, "K %d row %d chunk %d lane %d scales\n", K, r, ch, c);
          for (int g = 0; g < 4; ++g) {
            CHECK(mxfp4_group8(l.qa, g) == F::quant8(blocks[b0], 8 * g), "K %d lane %d block a group %d\n", K, c, g);
            CHECK(mxfp4_group8(l.qb, g) == F::quant8(blocks[b0 + 1], 8 * g), "K %d lane %d block b group %d\n", K, c, g);
          }
        }
      }
    }
  }
}

// The bf16 GEMV's MXFP4 decode (mma_gemv.cuh Mxfp4Tile, bf16 activations): the E2M1 bits placed in
// bf16's (e2m1_bf16x2) are each code's value x 2^-126, group by group in mxfp4_group8's order, and
// the pair products by mxfp4_bf16_scale's factors, each rounded once as the device's bf16 multiply
// does, equal the CPU codec's kvalue x e8m0_half(e) rounded to bf16, for every code and every scale
// byte: one product (s1) on the common path (e <= 128), both (s1, then s2 = 1 or 2^(e - 128)) on
// the rare one. Code 8 decodes to -0 where ggml has +0.
uint16_t bf16_mul_rn(uint16_t a, uint16_t b) {
  // The product of two bf16 is exact in double; here it has at most 2 significant bits, so it is
  // exact in f32 too unless it is past f32's range (then RNE gives inf).
  const double p = static_cast<double>(bf16_to_float(a)) * static_cast<double>(bf16_to_float(b));
  if (std::fabs(p) > static_cast<double>(FLT_MAX)) return p > 0 ? 0x7F80 : 0xFF80;
  return float_to_bf16(static_cast<float>(p));
}

void test_mxfp4_bf16(std::mt19937_64& gen) {
  const int kvalues[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
  const float two126 = std::ldexp(1.0f, 126);
  for (int e = 0; e < 256; ++e) {
    const Mxfp4Bf16Scale s = mxfp4_bf16_scale(static_cast<uint8_t>(e));
    CHECK((s.s1 >> 16) == (s.s1 & 0xFFFF) && (s.s2 >> 16) == (s.s2 & 0xFFFF), "e=%d: both halves alike\n", e);
    for (int c0 = 0; c0 < 16; ++c0) {
      for (int c1 = 0; c1 < 16; ++c1) {
        // Bits 4-7 and 20-23 (the byte's other code) are ignored.
        const uint32_t junk = static_cast<uint32_t>(gen()) & 0x00F000F0u;
        const uint32_t b = e2m1_bf16x2(static_cast<uint32_t>(c0) | (static_cast<uint32_t>(c1) << 16) | junk);
        const int cs[2] = {c0, c1};
        for (int h = 0; h < 2; ++h) {
          const uint16_t bits = static_cast<uint16_t>(b >> (16 * h));
          const int c = cs[h];
          if (e == 0)
            CHECK(bf16_to_float(bits) * two126 == 0.5f * static_cast<float>(kvalues[c]) && ((bits >> 15) == (c >> 3)),
                  "code %d: bf16 %#06x is not its E2M1 value x 2^-126\n", c, bits);
          const uint16_t want = float_to_bf16(mul_rn(static_cast<float>(kvalues[c]), e8m0_half(static_cast<uint8_t>(e))));
          const uint16_t one = bf16_mul_rn(bits, static_cast<uint16_t>(s.s1));
          const uint16_t two = bf16_mul_rn(one, static_cast<uint16_t>(s.s2));
          auto same = [&](uint16_t got) { return got == want || (c == 8 && want == 0 && got == 0x8000); };
          if (e <= 128) CHECK(same(one), "e=%d code %d: one product %#06x, want %#06x\n", e, c, one, want);
          CHECK(same(two), "e=%d code %d: two products %#06x, want %#06x\n", e, c, two, want);
        }
      }
    }
  }
  // Group by group, the pairs hold mxfp4_group8's elements in order.
  for (int trial = 0; trial < 2000; ++trial) {
    uint32_t q[4];
    for (auto& w : q) w = static_cast<uint32_t>(gen());
    for (int g = 0; g < 4; ++g) {
      const uint64_t k8 = mxfp4_group8(q, g);
      const Bf16x2x4 v = mxfp4_bf16_group8(q, g);
      for (int t = 0; t < 8; ++t) {
        const auto kv = static_cast<int8_t>((k8 >> (8 * t)) & 0xFF);
        const float got = bf16_to_float(static_cast<uint16_t>(v.v[t / 2] >> (16 * (t & 1)))) * two126;
        CHECK(got == 0.5f * static_cast<float>(kv), "group %d element %d: %g, want %g\n", g, t, got, 0.5f * kv);
      }
    }
  }
}

// The fused GEMM's Q3_K and Q6_K reads (wgmma_gguf.cu decode_step: q3k_pieces, q6k_pieces through
// words8_at2): at every 2-byte misalignment of a block and for the thread shapes DP = 4 and 8, each
// piece equals Format<>::quant8, and the words read lie inside the block (or 6 bytes before it).
template <GGMLType T, int DP>
void check_gemm_pieces(const typename Format<T>::Block& b, const char* where) {
  for (int i0 = 0; i0 < QK_K; i0 += 8 * DP) {
    uint64_t q[DP];
    if constexpr (T == GGMLType::Q3_K) q3k_pieces<DP>(b, i0, q);
    else q6k_pieces<DP>(b, i0, q);
    for (int p = 0; p < DP; ++p)
      CHECK(q[p] == Format<T>::quant8(b, i0 + 8 * p), "%s: DP %d, piece at %d\n", where, DP, i0 + 8 * p);
  }
}

void test_gemm_pieces(std::mt19937_64& gen) {
  static_assert(sizeof(block_q3_K) == 110, "110-byte blocks");
  for (int trial = 0; trial < 2000; ++trial) {
    alignas(8) uint8_t buf[8 + 110 + 16];
    for (auto& v : buf) v = static_cast<uint8_t>(gen());
    const int off = 8 + 2 * (trial % 4);  // the block 0, 2, 4 or 6 bytes past an 8-byte boundary
    const auto* b = reinterpret_cast<const block_q3_K*>(buf + off);
    check_gemm_pieces<GGMLType::Q3_K, 4>(*b, "q3k_pieces");
    check_gemm_pieces<GGMLType::Q3_K, 8>(*b, "q3k_pieces");
    // words8_at2 reads the 8-byte words from below p to past p + 32: for hmask (the block's start)
    // at most 6 bytes before the block, for qs (32 + 32n, n = 0, 1) at most 8 past byte 96 + 32n - 32.
    const uintptr_t lo = reinterpret_cast<uintptr_t>(b->hmask) & ~uintptr_t{7};
    const uintptr_t hi = (reinterpret_cast<uintptr_t>(b->qs + 32) & ~uintptr_t{7}) + 40;
    CHECK(reinterpret_cast<uintptr_t>(b) - lo <= 6 && hi <= reinterpret_cast<uintptr_t>(b) + 110,
          "words8_at2 reads from %d bytes before the block to %d past its start\n",
          static_cast<int>(reinterpret_cast<uintptr_t>(b) - lo), static_cast<int>(hi - reinterpret_cast<uintptr_t>(b)));
  }
  // Q8_0 (34-byte blocks): the four pieces of a block from nine 4-byte words, which start at most
  // 2 bytes before qs (inside the block) and end at most 2 past the block.
  for (int trial = 0; trial < 2000; ++trial) {
    alignas(8) uint8_t buf[8 + 34 + 8];
    for (auto& v : buf) v = static_cast<uint8_t>(gen());
    const auto* b = reinterpret_cast<const block_q8_0*>(buf + 8 + 2 * (trial % 4));
    uint64_t q[4];
    q8_0_pieces(*b, q);
    for (int p = 0; p < 4; ++p)
      CHECK(q[p] == Format<GGMLType::Q8_0>::quant8(*b, 8 * p), "q8_0_pieces: piece %d at offset %d\n", p, trial % 4);
    const uintptr_t at = reinterpret_cast<uintptr_t>(b->qs), first = at & ~uintptr_t{3};
    const uintptr_t end = first + (at % 4 ? 36 : 32);
    CHECK(first >= reinterpret_cast<uintptr_t>(b) && end <= reinterpret_cast<uintptr_t>(b) + 34 + 2,
          "q8_0_pieces reads outside the block and the 2 bytes after it\n");
  }
  // Q6_K likewise (210-byte blocks): ql from byte 0 (6 bytes before it at most) to 128 + 8, qh
  // from 128 to 200 + 8 at most.
  static_assert(sizeof(block_q6_K) == 210, "210-byte blocks");
  for (int trial = 0; trial < 2000; ++trial) {
    alignas(8) uint8_t buf[8 + 210 + 16];
    for (auto& v : buf) v = static_cast<uint8_t>(gen());
    const auto* b = reinterpret_cast<const block_q6_K*>(buf + 8 + 2 * (trial % 4));
    check_gemm_pieces<GGMLType::Q6_K, 4>(*b, "q6k_pieces");
    check_gemm_pieces<GGMLType::Q6_K, 8>(*b, "q6k_pieces");
    const uintptr_t at = reinterpret_cast<uintptr_t>(b);
    const uintptr_t hi = (reinterpret_cast<uintptr_t>(b->qh + 32) & ~uintptr_t{7}) + 40;
    CHECK(at - (at & ~uintptr_t{7}) <= 6 && hi <= at + 210, "q6k_pieces reads past the block\n");
  }
}

// The grouped GEMMs' rasterization (csrc/cuda/raster.h) visits every (M tile, N tile) exactly
// once, and walks `group` M tiles across every N tile before the next group.
void test_raster(std::mt19937_64&) {
  for (int64_t group : {1, 3, 8}) {
    for (int64_t mt = 1; mt <= 37; ++mt) {
      for (int64_t nt = 1; nt <= 23; ++nt) {
        std::vector<int> seen(static_cast<size_t>(mt * nt), 0);
        bool in_range = true, grouped = true;
        for (int64_t l = 0; l < mt * nt; ++l) {
          const TileCoord t = raster_tile(l, mt, nt, group);
          if (t.m < 0 || t.m >= mt || t.n < 0 || t.n >= nt) { in_range = false; continue; }
          ++seen[static_cast<size_t>(t.m * nt + t.n)];
          grouped = grouped && t.m / group == l / (group * nt);
        }
        bool once = true;
        for (int v : seen) once = once && v == 1;
        CHECK(in_range && once && grouped, "group %lld, %lld x %lld tiles\n", static_cast<long long>(group),
              static_cast<long long>(mt), static_cast<long long>(nt));
      }
    }
  }
}

void test_q8_1(std::mt19937_64& gen) {
  std::normal_distribution<float> normal;
  const float specials[] = {NAN, INFINITY, -INFINITY, FLT_MAX, -FLT_MAX, 1e-45f, 1.5e-36f, 0.0f};
  for (float s : specials) {
    for (int where : {0, 17, 31}) {
      float x[QK8_1];
      for (float& v : x) v = normal(gen) * (std::isfinite(s) && std::fabs(s) < 1e-30f ? 1e-40f : 1.0f);
      x[where] = s;
      q8_1_staged b;
      stage_q8_1([&](int i) { return x[i]; }, b);
      const bool finite = std::isfinite(s);
      if (!finite) {
        CHECK(std::isnan(b.d) && b.sum == 0, "non-finite %g: d=%g sum=%d", s, b.d, b.sum);
      } else if (b.d > 0.0f && std::isfinite(b.d)) {
        int32_t sum = 0;
        for (int i = 0; i < QK8_1; ++i) {
          sum += b.qs[i];
          CHECK(std::fabs(x[i] / b.d - b.qs[i]) <= 0.5f + 1e-3f * std::fabs(x[i] / b.d),
                "special %g: q[%d]=%d for x/d=%g", s, i, b.qs[i], x[i] / b.d);
        }
        CHECK(sum == b.sum, "sum");
      }
    }
  }
  // Integer dot products against decoding: decode(w) . (d * q) in double.
  std::uniform_int_distribution<int> byte(0, 255);
  for (GGMLType t : kFormats) {
    dispatch_format(t, [&](auto fmt) {
      using F = decltype(fmt);
      for (int trial = 0; trial < 20; ++trial) {
        typename F::Block w;
        auto* raw = reinterpret_cast<uint8_t*>(&w);
        for (size_t i = 0; i < sizeof w; ++i) raw[i] = static_cast<uint8_t>(byte(gen));
        float dec[F::QK];
        decode_block<F>(w, dec);
        q8_1_staged xs[F::QK / QK8_1];
        float x[F::QK];
        for (float& v : x) v = normal(gen);
        if (trial % 5 == 4) x[trial % F::QK] = NAN;
        for (int b = 0; b < F::QK / QK8_1; ++b) stage_q8_1([&](int i) { return x[b * QK8_1 + i]; }, xs[b]);
        const float got = dot_block_q8_1<F>(w, xs);
        double ref = 0, mag = 0, magq = 0;
        for (int i = 0; i < F::QK; ++i) {
          const double xv = double(xs[i / QK8_1].d) * xs[i / QK8_1].qs[i % QK8_1];
          ref += double(dec[i]) * xv;
          mag += std::fabs(double(dec[i]) * xv);
          magq += std::fabs(double(dec[i]) * xs[i / QK8_1].qs[i % QK8_1]);
        }
        if (std::isnan(ref) || trial % 5 == 4) {
          CHECK(std::isnan(got) || !std::isfinite(ref), "%s: NaN was masked (got %g)", type_name(t), got);
        } else if (std::isfinite(ref) && mag <= FLT_MAX && magq <= FLT_MAX) {
          // (Past FLT_MAX a partial f32 sum may overflow where the double one does not: MXFP4's
          // scales reach 2^127. magq bounds the contract's a * sum(q_w q_x) before its d_x.)
          CHECK(std::fabs(got - ref) <= 1e-4 * mag + 1e-30, "%s: dot %g vs %g (mag %g)", type_name(t), got, ref, mag);
        }
      }
    });
  }
}

// -- the CPU kernel --------------------------------------------------------------------------

struct Case {
  MoeKind kind;
  GGMLType fmt;  // quantized format, or BF16/F16 for WMMA
  bool reduce, per_pair;
  DType x_dtype, out_dtype;
  int64_t T, k, E, N, K;
  bool sparse = false;  // ids mostly out of range: a few valid pairs, at chunk boundaries among them
};

void store(std::vector<uint16_t>& v, size_t i, DType t, float f) {
  v[i] = t == DType::F16 ? float_to_half(f) : float_to_bf16(f);
}

// Run one case with exact-size buffers; check against a double reference and the id contract.
void run_case(const Case& c, std::mt19937_64& gen) {
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int64_t> any_id(kI32Min, kI32Max);
  const int64_t x_rows = c.per_pair ? c.T * c.k : c.T, pairs = c.T * c.k;
  MoeProblem p;
  p.kind = c.kind;
  p.wtype = c.fmt;
  p.layout = WeightLayout::ENK;
  p.reduce = c.reduce;
  p.x_per_pair = c.per_pair;
  p.x_dtype = c.x_dtype;
  p.score_dtype = DType::F32;
  p.out_dtype = c.out_dtype;
  p.T = c.T, p.k = c.k, p.K = c.K, p.N = c.N, p.E = c.E;

  // x
  std::vector<float> x32(static_cast<size_t>(x_rows * c.K));
  for (float& v : x32) v = normal(gen);
  std::vector<uint16_t> x16(c.x_dtype == DType::F32 ? 0 : x32.size());
  for (size_t i = 0; i < x16.size(); ++i) {
    store(x16, i, c.x_dtype, x32[i]);
    x32[i] = load_as_float(x16.data(), int64_t(i), c.x_dtype);
  }
  // ids: valid, -1, E, INT32_MIN, INT32_MAX and anything else in int32
  std::vector<int32_t> ids(static_cast<size_t>(pairs));
  const int32_t hostile[] = {-1, int32_t(c.E), kI32Min, kI32Max, -int32_t(c.E)};
  for (size_t i = 0; i < ids.size(); ++i) {
    const int r = int(gen() % 8);
    ids[i] = r < 4 ? int32_t(gen() % uint64_t(c.E)) : r < 7 ? hostile[gen() % 5] : int32_t(any_id(gen));
    const int64_t j = int64_t(i) % c.k;
    if (c.sparse && gen() % 2048 != 0 && j != 0 && j != c.k - 1 && j % (int64_t{1} << 20) > 1 &&
        j % (int64_t{1} << 20) < (int64_t{1} << 20) - 2)
      ids[i] = hostile[gen() % 5];
  }
  std::vector<float> scores(static_cast<size_t>(pairs));
  for (float& s : scores) s = normal(gen);
  // w and its decoded f32 form [E, N, K]
  std::vector<float> wf(static_cast<size_t>(c.E * c.N * c.K));
  std::vector<uint16_t> w16;
  std::vector<uint8_t> wq;
  for (float& v : wf) v = normal(gen) / 8;
  if (c.kind == MoeKind::WMMA) {
    w16.resize(wf.size());
    for (size_t i = 0; i < wf.size(); ++i) {
      store(w16, i, c.x_dtype, wf[i]);
      wf[i] = load_as_float(w16.data(), int64_t(i), c.x_dtype);
    }
  } else {
    wq.resize(static_cast<size_t>(c.E * c.N * row_bytes(c.fmt, c.K)));
    quantize_rows(c.fmt, wf.data(), c.E * c.N, c.K, wq.data());
    dequantize_rows(c.fmt, wq.data(), c.E * c.N, c.K, wf.data());
    if (c.kind == MoeKind::WMMA_GGUF)
      for (float& v : wf) v = round_to(c.x_dtype, v);
  }
  // staged x for SCALAR_GGUF: d * q
  std::vector<float> xr = x32;
  if (c.kind == MoeKind::SCALAR_GGUF) {
    for (int64_t b = 0; b < x_rows * c.K / QK8_1; ++b) {
      q8_1_staged blk;
      stage_q8_1([&](int i) { return x32[size_t(b * QK8_1 + i)]; }, blk);
      for (int i = 0; i < QK8_1; ++i) xr[size_t(b * QK8_1 + i)] = blk.d * blk.qs[i];
    }
  }
  const int64_t out_elems = c.reduce ? c.T * c.N : pairs * c.N;
  std::vector<float> out32(c.out_dtype == DType::F32 ? size_t(out_elems) : 0);
  std::vector<uint16_t> out16(c.out_dtype == DType::F32 ? 0 : size_t(out_elems));
  MoeBuffers b;
  b.x = c.x_dtype == DType::F32 ? static_cast<const void*>(x32.data()) : x16.data();
  b.ids = ids.data();
  b.w = c.kind == MoeKind::WMMA ? static_cast<const void*>(w16.data()) : wq.data();
  b.scores = scores.data();
  b.out = c.out_dtype == DType::F32 ? static_cast<void*>(out32.data()) : out16.data();
  moe_forward_cpu(p, b);

  auto out_at = [&](int64_t i) {
    return c.out_dtype == DType::F32 ? out32[size_t(i)] : load_as_float(out16.data(), i, c.out_dtype);
  };
  const double rtol = c.out_dtype == DType::F32 ? 0 : c.out_dtype == DType::F16 ? 1e-3 : 8e-3;
  for (int64_t t = 0; t < c.T; ++t) {
    for (int64_t n = 0; n < c.N; ++n) {
      double sum = 0, mag = 0;
      for (int64_t j = 0; j < c.k; ++j) {
        const int64_t q = t * c.k + j;
        const int32_t e = ids[size_t(q)];
        double v = 0, m = 0;
        if (e >= 0 && e < c.E) {
          const float* xrow = xr.data() + (c.per_pair ? q : t) * c.K;
          const float* wrow = wf.data() + (e * c.N + n) * c.K;
          for (int64_t kk = 0; kk < c.K; ++kk) {
            v += double(wrow[kk]) * xrow[kk];
            m += std::fabs(double(wrow[kk]) * xrow[kk]);
          }
          v *= scores[size_t(q)];
          m *= std::fabs(scores[size_t(q)]);
        }
        if (!c.reduce) {
          const float got = out_at(q * c.N + n);
          if (!(e >= 0 && e < c.E))
            CHECK(got == 0.0f, "pair with id %d is %g, not 0", e, got);
          CHECK(std::fabs(got - v) <= rtol * std::fabs(v) + 1e-5 * m + 1e-30, "kind %d pair (%lld,%lld,%lld): %g vs %g",
                int(c.kind), (long long)t, (long long)j, (long long)n, got, v);
        }
        sum += v;
        mag += m;
      }
      if (c.reduce) {
        const float got = out_at(t * c.N + n);
        CHECK(std::fabs(got - sum) <= rtol * std::fabs(sum) + 1e-5 * mag + 1e-30,
              "kind %d fmt %s token (%lld,%lld): %g vs %g", int(c.kind), type_name(c.fmt), (long long)t,
              (long long)n, got, sum);
      }
    }
  }
}

void test_moe_forward_cpu(std::mt19937_64& gen) {
  const int64_t shapes[][5] = {  // T, k, E, N, K-blocks
      {0, 2, 3, 5, 1}, {1, 1, 1, 1, 1}, {7, 3, 4, 17, 2}, {5, 4, 2, 33, 1}, {9, 2, 5, 16, 0},
      {3, 5, 5, 0, 1}, {40, 2, 3, 3, 1}};
  int cases = 0;
  for (const auto& s : shapes) {
    for (bool reduce : {true, false}) {
      for (bool per_pair : {false, true}) {
        const int64_t T = s[0], k = s[1], E = s[2], N = s[3], nb = s[4];
        for (DType xd : {DType::F16, DType::BF16})
          run_case({MoeKind::WMMA, xd == DType::F16 ? GGMLType::F16 : GGMLType::BF16, reduce, per_pair, xd,
                    (cases++ % 2) ? DType::F32 : xd, T, k, E, N, nb * 24 + (nb ? 5 : 0)}, gen);
        for (GGMLType f : kFormats) {
          const int64_t K = nb * block_elems(f);
          run_case({MoeKind::SCALAR_GGUF, f, reduce, per_pair, DType::F32, DType::F32, T, k, E, N, K}, gen);
          run_case({MoeKind::WMMA_GGUF, f, reduce, per_pair, (cases % 2) ? DType::BF16 : DType::F16,
                    (cases++ % 3) ? DType::F32 : DType::BF16, T, k, E, N, K}, gen);
        }
      }
    }
  }
}

// Calls whose k * N or k exceed the CPU kernel's scratch budget: output columns in several
// passes, and one token's pairs cut across chunks with its partial sums carried.
void test_moe_forward_cpu_chunked(std::mt19937_64& gen) {
  const int64_t shapes[][4] = {{2, int64_t{1} << 14, int64_t{1} << 11, 1}, {1, int64_t{1} << 21, 4, 0}};
  for (const auto& s : shapes) {
    const int64_t T = s[0], k = s[1], N = s[2];
    for (bool reduce : {true, false}) {
      if (!reduce && s[3]) continue;  // the [T, k, N] output of the first shape would be 256 MB
      run_case({MoeKind::WMMA, GGMLType::BF16, reduce, false, DType::BF16, DType::F32, T, k, 3, N, 32, true}, gen);
      run_case({MoeKind::SCALAR_GGUF, GGMLType::Q8_0, reduce, false, DType::F32, DType::F32, T, k, 3, N, 32, true}, gen);
      run_case({MoeKind::WMMA_GGUF, GGMLType::Q4_K, reduce, false, DType::BF16, DType::BF16, T, k, 3, N, 256, true}, gen);
    }
  }
}

}  // namespace

int main() {
  std::mt19937_64 gen(20250601);
  const struct {
    const char* name;
    void (*fn)(std::mt19937_64&);
  } tests[] = {
      {"round_trip", test_round_trip},
      {"hostile_values", test_hostile_values},
      {"random_bytes", test_random_bytes},
      {"bad_arguments", [](std::mt19937_64&) { test_bad_arguments(); }},
      {"mxfp4_trait", test_mxfp4_trait},
      {"mxfp4_gemv_lanes", test_mxfp4_gemv_lanes},
      {"mxfp4_gemv_rows", test_mxfp4_gemv_rows},
      {"mxfp4_bf16", test_mxfp4_bf16},
      {"gemm_pieces", test_gemm_pieces},
      {"raster", test_raster},
      {"q8_1", test_q8_1},
      {"moe_forward_cpu", test_moe_forward_cpu},
      {"moe_cpu_chunked", test_moe_forward_cpu_chunked},
  };
  for (const auto& t : tests) {
    const int before = g_failures;
    try {
      t.fn(gen);
    } catch (const std::exception& e) {
      ++g_failures;
      std::fprintf(stderr, "%s: unexpected exception: %s\n", t.name, e.what());
    }
    std::printf("%-16s %s\n", t.name, g_failures == before ? "ok" : "FAILED");
  }
  std::printf("%d checks, %d failed\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
