// Few pairs per expert on the tensor cores (WMMA_GGUF at decode-time T): each warp owns
// a tile of 16 weight rows of one expert and runs mma.sync m16n8k16 with the weights as the m16
// operand and up to 8 of that expert's pairs as the n8 operand (or 16 as two n8 operands on the
// same decoded weights), so every weight is read from memory and decoded once per pass of up to
// 8 (16) of the expert's pairs, and the products and the f32 accumulation are the tensor cores'
// (as in the GEMM).
//
// Lane = 4 g + c holds rows g and g + 8 of the tile and, per chunk, Tile::GROUPS groups of 8
// consecutive K elements of each; group G starts at Tile::kpos(c, G). The mma's 16 k slots of
// lane c are (2c, 2c+1, 2c+8, 2c+9): group G feeds two mmas, its elements 0-3 the first and 4-7
// the second, and x (pair slot g of the pass) is loaded with the same map (a permutation of k in
// both operands leaves the dot product as it is). The decoded pairs land directly in the A
// registers and a 16-byte x load in the B registers: no moves.
//
// Block: 16 rows of N x a group of touched experts (non-reduce) or all of them (reduce); its warps
// take (expert, K split) items. Each warp finds its expert's pairs by scanning the ids in pair
// order, so everything is deterministic; partial dots go to shared memory per (split, pair, row)
// and the block sums splits in order and, with reduce, a token's k pairs in order j = 0..k-1.
// No allocation, no host reads: CUDA-graph safe.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "../common/gguf_formats.h"
#include "common.cuh"
#include "decode.cuh"
#include "kernels.h"

namespace jax_moe {

constexpr int kMmaRows = 16;         // weight rows per warp tile (the mma's m)
constexpr int kMmaPass = 8;          // pairs per mma pass (the mma's n)
// kMmaChunk, kMmaMaxPairs, kMmaMaxE and mma_gemv_fits: plan.h, which decides where this runs.
constexpr int kMmaMaxWarps = 8;
// Shared memory for the partial dots (P x 16 floats per split): kMmaMaxPairs pairs at one split.
// With the static ids and bitmaps a block then takes under 70 KiB: 3 per Hopper SM, and within
// every sm_80+ GPU's per-block limit (99 KiB on the smallest).
constexpr int kMmaPartialBytes = 64 * 1024;
static_assert(kMmaMaxPairs * kMmaRows * 4 <= kMmaPartialBytes, "one split of the largest call fits");
constexpr int kMmaSplitPartialBytes = 32 * 1024;  // K splits only while their partials fit in this

struct MmaGemvArgs {
  const void* x;
  const int32_t* ids;
  const void* w;
  const void* scores;
  void* out;
  int64_t T, k, N, K, E, row_bytes;  // row_bytes: bytes of one weight row
  DType score_dtype, out_dtype;
  bool reduce, x_per_pair;
  int splits;        // the chunks of K split into this many items per expert
  int group;         // touched experts per block (grid.y groups of them)
};

// c += a * b on the tensor cores, m16n8k16, f32 accumulators.
template <DType D>
__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (D == DType::BF16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
#else
  __trap();  // the host never launches this kernel below sm_80
#endif
}

// --- weight tiles: how lane c of a row gets its GROUPS groups of a chunk (32 GROUPS elements) as
// packed D values. struct Raw: the lane's raw bytes of one chunk of one row (registers, loaded
// ahead DEPTH chunks); load(raw, row, ch, c); prep(raw, c, prep) once per chunk;
// group<G>(raw, prep[, c]) -> uint4 (8 packed values, element 0 in the low half of .x).
// MIN_BLOCKS: the blocks of kMmaMaxWarps warps per SM the kernel is compiled for (its register cap);
// PARTIAL_K: whether the tile reads rows where K % 256 != 0 (plan.h: mma_gemv_k_fits); TWO_BLOCKS:
// whether it runs passes of 16 pairs (two n8 blocks) in 128 registers without spills.

// Eight decoded values rounded once to D, packed in pairs (element 0 in the low half of .x).
template <DType D>
__device__ __forceinline__ uint4 round8(const float (&v)[8]) {
  return make_uint4(round2<D>(v[0], v[1]), round2<D>(v[2], v[3]), round2<D>(v[4], v[5]), round2<D>(v[6], v[7]));
}

// Q4_K and Q5_K with whole-block loads: the 16-byte header (d, dmin, scales; the same in both)
// and the lane's 32 bytes of low quant bits, whose low nibbles are sub-block 2c and high nibbles
// sub-block 2c + 1 (ggml's layout); Q5_K adds all 32 bytes of high bits (bit 2c + hi of byte l).
// a * q - m as one fma (a * q is exact in f32, so it equals the unfused form), rounded to D.
template <GGMLType T, DType D>
struct KQuantTile {
  static constexpr bool Q5 = T == GGMLType::Q5_K;
  static_assert(T == GGMLType::Q4_K || Q5, "Q4_K or Q5_K");
  static constexpr int BLOCK = Q5 ? 176 : 144, QS = Q5 ? 48 : 16;
  // Q4_K: one chunk ahead in 80 registers, 3 blocks (24 warps) per SM; Q5_K needs 2 chunks ahead
  // and 2 blocks (80 registers spill). benchmarks/NOTES.md, v25.
  static constexpr int GROUPS = 8, DEPTH = Q5 ? 2 : 1, MIN_BLOCKS = Q5 ? 2 : 3;
  static constexpr bool PARTIAL_K = false, TWO_BLOCKS = !Q5;  // Q5_K's 16-pair passes spill
  struct Raw { uint4 h, q0, q1, qh0, qh1; };
  struct Prep { float a0, m0, a1, m1; };
  static __device__ __forceinline__ int kpos(int c, int g) { return 64 * c + 8 * g; }
  static __device__ __forceinline__ void load(Raw& r, const uint8_t* row, int64_t ch, int c) {
    const uint8_t* b = row + ch * BLOCK;
    r.h = __ldg(reinterpret_cast<const uint4*>(b));
    r.q0 = __ldg(reinterpret_cast<const uint4*>(b + QS + 32 * c));
    r.q1 = __ldg(reinterpret_cast<const uint4*>(b + QS + 16 + 32 * c));
    if constexpr (Q5) {
      r.qh0 = __ldg(reinterpret_cast<const uint4*>(b + 16));
      r.qh1 = __ldg(reinterpret_cast<const uint4*>(b + 32));
    }
  }
  // k4_scale_min for sub-blocks 2c and 2c + 1, on the header's registers.
  static __device__ __forceinline__ void prep(const Raw& r, int c, Prep& p) {
    const float d = half_to_float(static_cast<uint16_t>(r.h.x & 0xffff));
    const float dmin = half_to_float(static_cast<uint16_t>(r.h.x >> 16));
    const bool hi = c >= 2;
    const int sh = 16 * (c & 1);  // byte (2c) & 3 of each word, and the next byte
    const uint32_t y = r.h.y >> sh, z = r.h.z >> sh, w = r.h.w >> sh;
    int sc[2], mn[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const uint32_t by = (y >> (8 * i)) & 0xff, bz = (z >> (8 * i)) & 0xff, bw = (w >> (8 * i)) & 0xff;
      sc[i] = hi ? static_cast<int>((bw & 0xF) | ((by >> 6) << 4)) : static_cast<int>(by & 63);
      mn[i] = hi ? static_cast<int>((bw >> 4) | ((bz >> 6) << 4)) : static_cast<int>(bz & 63);
    }
    p.a0 = mul_rn(d, static_cast<float>(sc[0]));
    p.m0 = mul_rn(dmin, static_cast<float>(mn[0]));
    p.a1 = mul_rn(d, static_cast<float>(sc[1]));
    p.m1 = mul_rn(dmin, static_cast<float>(mn[1]));
    // Q4_K's high nibbles are decoded in place (16 q, no shift): a / 16 is exact (a power of two,
    // and a >= 2^-24 or 0 stays normal), and fma(a / 16, 16 q, -m) rounds a * q - m exactly once.
    if constexpr (!Q5) p.a1 = mul_rn(p.a1, 0.0625f);
  }
  template <int G>
  static __device__ __forceinline__ uint4 group(const Raw& r, Prep& p, int c) {
    const uint4& q = (G & 2) ? r.q1 : r.q0;
    uint32_t lo = (G & 1) ? q.z : q.x, hi = (G & 1) ? q.w : q.y;
    // Q4_K's sub-block 2c + 1 stays in the high nibbles (16 q; prep scaled its a by 1 / 16).
    constexpr uint32_t kMask = (!Q5 && G >= 4) ? 0xF0F0F0F0u : 0x0F0F0F0Fu;
    if (Q5 && G >= 4) { lo >>= 4; hi >>= 4; }
    lo &= kMask;
    hi &= kMask;
    if constexpr (Q5) {
      const uint4& h = (G & 2) ? r.qh1 : r.qh0;
      const int s = 2 * c + (G >= 4);
      lo |= ((((G & 1) ? h.z : h.x) >> s) & 0x01010101u) << 4;
      hi |= ((((G & 1) ? h.w : h.y) >> s) & 0x01010101u) << 4;
    }
    const float a = G < 4 ? p.a0 : p.a1, m = G < 4 ? p.m0 : p.m1;
    float v[8];
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      const uint32_t bits = __byte_perm(t < 4 ? lo : hi, 0x4B000000u, 0x7540u | (t & 3));
      v[t] = __fmaf_rn(a, __fsub_rn(__uint_as_float(bits), 8388608.0f), -m);
    }
    return round8<D>(v);
  }
};

// Q8_0 from 8-byte loads: a chunk is 8 blocks (272 bytes, 16-byte aligned rows); lane c's two
// blocks 2c, 2c + 1 are the 68 bytes at 68c, 4-byte aligned, read as 9 aligned 8-byte words and
// shifted by a word where 68c is not 8-aligned; block 2c's quants sit 2 bytes off a word boundary
// (a funnel shift per word), block 2c + 1's on one.
template <DType D>
struct Q80Tile {
  static constexpr int GROUPS = 8, DEPTH = 1, MIN_BLOCKS = 3;  // 80 registers, no spills (v25)
  static constexpr bool PARTIAL_K = false, TWO_BLOCKS = true;
  struct Raw { uint2 v[9]; };
  struct Prep { float a0, a1; uint32_t w[17]; };
  static __device__ __forceinline__ int kpos(int c, int g) { return 64 * c + 8 * g; }
  static __device__ __forceinline__ void load(Raw& r, const uint8_t* row, int64_t ch, int c) {
    const uint2* p = reinterpret_cast<const uint2*>(row + ch * 272 + 68 * c - 4 * (c & 1));
#pragma unroll
    for (int i = 0; i < 9; ++i) r.v[i] = __ldg(p + i);
  }
  static __device__ __forceinline__ void prep(const Raw& r, int c, Prep& p) {
    const bool odd = c & 1;
#pragma unroll
    for (int i = 0; i < 17; ++i) {
      const uint32_t lo = (i & 1) ? r.v[i / 2].y : r.v[i / 2].x;
      const uint32_t hi = ((i + 1) & 1) ? r.v[(i + 1) / 2].y : r.v[(i + 1) / 2].x;
      p.w[i] = odd ? hi : lo;
    }
    p.a0 = half_to_float(static_cast<uint16_t>(p.w[0] & 0xffff));
    p.a1 = half_to_float(static_cast<uint16_t>(p.w[8] >> 16));
  }
  template <int G>
  static __device__ __forceinline__ uint4 group(const Raw&, Prep& p) {
    uint32_t lo, hi;
    if constexpr (G < 4) {
      lo = __funnelshift_r(p.w[2 * G], p.w[2 * G + 1], 16);
      hi = __funnelshift_r(p.w[2 * G + 1], p.w[2 * G + 2], 16);
    } else {
      lo = p.w[9 + 2 * (G - 4)];
      hi = p.w[10 + 2 * (G - 4)];
    }
    lo ^= 0x80808080u;
    hi ^= 0x80808080u;
    const float a = G < 4 ? p.a0 : p.a1;
    float v[8];
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      const uint32_t bits = __byte_perm(t < 4 ? lo : hi, 0x4B000000u, 0x7540u | (t & 3));
      v[t] = __fmul_rn(a, __fsub_rn(__uint_as_float(bits), 8388736.0f));
    }
    return round8<D>(v);
  }
};

// MXFP4 from 8-byte loads: a chunk is 8 blocks of 17 bytes (136); lane c's blocks 2c, 2c + 1 are
// the 34 bytes at 34c, inside the five aligned words that mxfp4_lane_addr names (rows on any 2-byte
// boundary: gpt-oss's K = 2880 gives 1530-byte rows). gguf_formats.h's mxfp4_lane (tested on the
// host against Format<MXFP4>) takes the scales and quants out of them once per chunk.
// With bf16 activations a group is four byte permutes, four shift-shift-LOP3s (mxfp4_bf16_group8:
// the E2M1 bits placed in bf16's, the value x 2^-126) and four bf16 pair products by 2^(e - 1),
// each the ggml value rounded once: no conversions, about 2.5 instructions a weight against the f32
// path's 6.5. Scales past 2^1 (e > 128: 2^(e - 1) is past bf16's range) take a second product by
// 2^(e - 128) (mxfp4_bf16_scale); a chunk where any lane's block has one runs the RARE variant
// (mma_chunk), so the common path issues no predicated second products. With f16 activations the
// E2M1 byte permute (e2m1_bytes) and the f32 path, like Format<MXFP4>::quant8.
struct Mxfp4Raw { uint2 v[5]; int at; };
struct Mxfp4Prep { float a0, a1; Mxfp4Lane l; Mxfp4Bf16Scale sa, sb; };
template <DType D, bool RARE = false>
struct Mxfp4Tile {
  using F = Format<GGMLType::MXFP4>;
  static constexpr int GROUPS = 8, DEPTH = 1, MIN_BLOCKS = 3, CHUNK_BYTES = kMmaChunk / F::QK * 17;
  static_assert(CHUNK_BYTES == 136 && sizeof(typename F::Block) == 17, "8 blocks of 17 bytes per chunk");
  static constexpr bool PARTIAL_K = true;  // K % 64 == 0: rows on 2-byte boundaries, a partial last chunk
  static constexpr bool TWO_BLOCKS = true;
  static constexpr bool BF16 = D == DType::BF16;
  // mma_chunk's rare path: the tile that also takes the second products (bf16 only).
  static constexpr bool HAS_RARE = BF16 && !RARE;
  using Rare = Mxfp4Tile<D, true>;
  using Raw = Mxfp4Raw;
  using Prep = Mxfp4Prep;
  static __device__ __forceinline__ int kpos(int c, int g) { return 64 * c + 8 * g; }
  static __device__ __forceinline__ void load(Raw& r, const uint8_t* row, int64_t ch, int c) {
    const Mxfp4LaneAddr where = mxfp4_lane_addr(row, ch, c);
    const uint2* p = reinterpret_cast<const uint2*>(where.words);
#pragma unroll
    for (int i = 0; i < 5; ++i) r.v[i] = __ldg(p + i);
    r.at = where.at;
  }
  static __device__ __forceinline__ Mxfp4Lane lane(const Raw& r) {
    const uint32_t w[10] = {r.v[0].x, r.v[0].y, r.v[1].x, r.v[1].y, r.v[2].x,
                            r.v[2].y, r.v[3].x, r.v[3].y, r.v[4].x, r.v[4].y};
    return mxfp4_lane(w, r.at);
  }
  static __device__ __forceinline__ void prep(const Raw& r, int, Prep& p) {
    p.l = lane(r);
    if constexpr (BF16) {
      p.sa = mxfp4_bf16_scale(p.l.ea);
      p.sb = mxfp4_bf16_scale(p.l.eb);
    } else {
      p.a0 = e8m0_half(p.l.ea);
      p.a1 = e8m0_half(p.l.eb);
    }
  }
  // Whether this lane's blocks of the chunk need the rare path (only their scale bytes are used).
  static __device__ __forceinline__ bool rare(const Raw& r) {
    const Mxfp4Lane l = lane(r);
    return l.ea > 128 || l.eb > 128;
  }
  template <int G>
  static __device__ __forceinline__ uint4 group(const Raw&, Prep& p) {
    if constexpr (BF16) {
      return mxfp4_bf16_scaled<RARE>(mxfp4_bf16_group8(G < 4 ? p.l.qa : p.l.qb, G & 3), G < 4 ? p.sa : p.sb);
    } else {
      return decode_quants8<F, D>(mxfp4_group8(G < 4 ? p.l.qa : p.l.qb, G & 3), G < 4 ? p.a0 : p.a1, 0.0f);
    }
  }
};

// NW little-endian words of the bytes at the 2-byte-aligned p, from aligned 8-byte loads (an
// 8-byte word more than the NW / 2 that cover them, then a word select and a funnel shift by the
// misalignment). Reads at most 8 bytes past p + 4 NW: callers keep that inside the block.
template <int NW>
struct Words2 {
  static_assert(NW % 2 == 0, "whole 8-byte words");
  uint2 v[NW / 2 + 1];
  __device__ __forceinline__ void load(const uint8_t* p, int& shift) {
    const auto a = reinterpret_cast<uintptr_t>(p);
    const uint2* q = reinterpret_cast<const uint2*>(a & ~uintptr_t{7});
#pragma unroll
    for (int i = 0; i < NW / 2 + 1; ++i) v[i] = __ldg(q + i);
    shift = static_cast<int>(a & 7);
  }
  __device__ __forceinline__ uint32_t raw(int k) const { return (k & 1) ? v[k >> 1].y : v[k >> 1].x; }
  // Word i (a compile-time index) of the bytes at p, shifted right by `bits` (0..7) more.
  __device__ __forceinline__ uint32_t word(int i, int shift, int bits = 0) const {
    const bool up = shift >= 4;
    return __funnelshift_r(up ? raw(i + 1) : raw(i), up ? raw(i + 2) : raw(i + 1), 8 * (shift & 3) + bits);
  }
};

// Q6_K (210-byte blocks, 2-byte aligned): lane c takes elements 64c .. 64c+63, which are half
// n = c / 2 of the block, quarters 2 (c & 1) and 2 (c & 1) + 1: the 64 bytes of low nibbles
// ql[64n ..] (nibble c & 1), the 32 bytes of high bits qh[32n ..] (bits 4 (c & 1) + 2 (G >= 4)),
// the four 8-bit scales scales[4c ..] and d, each read once per chunk.
template <DType D>
struct Q6KTile {
  static constexpr int GROUPS = 8, DEPTH = 1, MIN_BLOCKS = 2;
  static constexpr bool PARTIAL_K = false, TWO_BLOCKS = false;  // its 16-pair passes spill
  struct Raw { Words2<16> ql; Words2<8> qh; uint16_t s0, s1, d; int sl, sh; };
  struct Prep { float a[4]; };
  static __device__ __forceinline__ int kpos(int c, int g) { return 64 * c + 8 * g; }
  static __device__ __forceinline__ void load(Raw& r, const uint8_t* row, int64_t ch, int c) {
    const uint8_t* b = row + ch * 210;
    const int n = c >> 1;
    r.ql.load(b + 64 * n, r.sl);
    r.qh.load(b + 128 + 32 * n, r.sh);
    const auto* h = reinterpret_cast<const uint16_t*>(b);
    r.s0 = __ldg(h + 96 + 2 * c);
    r.s1 = __ldg(h + 97 + 2 * c);
    r.d = __ldg(h + 104);
  }
  static __device__ __forceinline__ void prep(const Raw& r, int, Prep& p) {
    const float d = half_to_float(r.d);
    const uint32_t sc = static_cast<uint32_t>(r.s0) | (static_cast<uint32_t>(r.s1) << 16);
#pragma unroll
    for (int i = 0; i < 4; ++i) p.a[i] = mul_rn(d, static_cast<float>(static_cast<int8_t>((sc >> (8 * i)) & 0xff)));
  }
  template <int G>
  static __device__ __forceinline__ uint4 group(const Raw& r, Prep& p, int c) {
    constexpr int wq = 2 * (G & 3) + (G >= 4 ? 8 : 0), wh = 2 * (G & 3);
    const int nib = 4 * (c & 1), hsh = 4 * (c & 1) + (G >= 4 ? 2 : 0);
    uint32_t lo = (r.ql.word(wq, r.sl) >> nib) & 0x0F0F0F0Fu, hi = (r.ql.word(wq + 1, r.sl) >> nib) & 0x0F0F0F0Fu;
    lo |= ((r.qh.word(wh, r.sh) >> hsh) & 0x03030303u) << 4;
    hi |= ((r.qh.word(wh + 1, r.sh) >> hsh) & 0x03030303u) << 4;
    const float a = p.a[G / 2];
    float v[8];
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      const uint32_t bits = __byte_perm(t < 4 ? lo : hi, 0x4B000000u, 0x7540u | (t & 3));
      v[t] = __fmul_rn(a, __fsub_rn(__uint_as_float(bits), 8388640.0f));  // 2^23 + 32: q - 32, exact
    }
    return round8<D>(v);
  }
};

// Q2_K (84-byte blocks, 4-byte aligned: scales[16], qs[64], d, dmin): lane c takes elements
// 64c .. 64c+63, which are half n = c / 2 of the block at bit pairs j = 2 (c & 1) and j + 1 of the
// 32 bytes qs[32n ..] (element 128n + 32j + l is bits 2j, 2j + 1 of qs[32n + l]), and sub-blocks
// 4c .. 4c+3 (one 4-byte word of scales), read as 4-byte words (the block's alignment). The quants
// stay in place: masked with 3 << 2j each byte is 4^j q, and that sub-block's a is scaled by 4^-j
// (exact: a power of two, and a >= 2^-24 or 0 stays normal), so fma(a 4^-j, 4^j q, -m) rounds
// a q - m once, as ggml's f32 expression does. A sub-block's a and m are made at its first group.
template <DType D>
struct Q2KTile {
  static constexpr int GROUPS = 8, DEPTH = 1, MIN_BLOCKS = 3;
  static constexpr bool PARTIAL_K = false, TWO_BLOCKS = true;
  struct Raw { uint32_t q[8], sc, dd; };
  struct Prep { float d, dmin, a, m; };
  static __device__ __forceinline__ int kpos(int c, int g) { return 64 * c + 8 * g; }
  static __device__ __forceinline__ void load(Raw& r, const uint8_t* row, int64_t ch, int c) {
    const auto* b = reinterpret_cast<const uint32_t*>(row + ch * 84);
#pragma unroll
    for (int i = 0; i < 8; ++i) r.q[i] = __ldg(b + 4 + 8 * (c >> 1) + i);
    r.sc = __ldg(b + c);
    r.dd = __ldg(b + 20);
  }
  static __device__ __forceinline__ void prep(const Raw& r, int, Prep& p) {
    p.d = half_to_float(static_cast<uint16_t>(r.dd & 0xffff));
    p.dmin = half_to_float(static_cast<uint16_t>(r.dd >> 16));
  }
  template <int G>
  static __device__ __forceinline__ uint4 group(const Raw& r, Prep& p, int c) {
    // Bytes 8 (G & 3) .. +7 of the 32, bit pair j = 2 (c & 1) + G / 4; sub-block t of the lane's 4.
    constexpr int t = 2 * (G >> 2) + ((G & 3) >= 2 ? 1 : 0);
    const int sh = 2 * (2 * (c & 1) + (G >> 2));
    if constexpr ((G & 1) == 0) {
      const uint32_t byte = (r.sc >> (8 * t)) & 0xff;
      const float inv = __uint_as_float(static_cast<uint32_t>(127 - sh) << 23);  // 2^-2j = 4^-j
      p.a = mul_rn(mul_rn(p.d, static_cast<float>(byte & 0xF)), inv);
      p.m = mul_rn(p.dmin, static_cast<float>(byte >> 4));
    }
    const uint32_t mask = 0x03030303u << sh;
    const uint32_t lo = r.q[2 * (G & 3)] & mask, hi = r.q[2 * (G & 3) + 1] & mask;
    float v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const uint32_t bits = __byte_perm(u < 4 ? lo : hi, 0x4B000000u, 0x7540u | (u & 3));
      v[u] = __fmaf_rn(p.a, __fsub_rn(__uint_as_float(bits), 8388608.0f), -p.m);
    }
    return round8<D>(v);
  }
};

// Q3_K (110-byte blocks, 2-byte aligned: hmask[32], qs[64], scales[12], d): lane c takes elements
// 64c .. 64c+63, half n = c / 2 of the block at bit pairs j = 2 (c & 1) + jp (jp = 0, 1) of the
// 32 bytes qs[32n ..], high bits 4n + j = 2c + jp of hmask[0 .. 31], and sub-blocks 4c .. 4c+3
// (element 128n + 32j + l: low bits 2j, 2j + 1 of qs[32n + l], high bit 4n + j of hmask[l], as
// Format<Q3_K>). qs comes shifted right by 4 (c & 1) in the funnel shift that aligns it, so each
// byte holds its two bit pairs at 0-1 and 2-3; hmask's bit is rotated to 2 jp + 2, above them. A
// byte is then 4^jp (q + 4h) and 2^23 + that, less 2^23 + 4^(jp+1), is 4^jp (q + 4h - 4) exactly;
// the sub-block's a = d (sc - 32) is scaled by 4^-jp (exact), and a q3 is exact in f32 (17 + 3
// significant bits), as ggml's f32 product is.
template <DType D>
struct Q3KTile {
  static constexpr int GROUPS = 8, DEPTH = 1, MIN_BLOCKS = 2;
  static constexpr bool PARTIAL_K = false, TWO_BLOCKS = false;  // its 16-pair passes spill
  // qs (at 32 + 32n) and hmask (at 0) sit equally far off 8-byte boundaries: one shift, sh.
  struct Raw { Words2<8> qs, hm; uint32_t lo, hi; uint16_t d; int sh; };
  struct Prep { float a[4]; };
  // Group g: bit pair jp = g & 1 of bytes 8 (g >> 1) .. +7, so that groups 2i and 2i + 1 use the
  // same words one after the other (no word kept live across the chunk).
  static __device__ __forceinline__ int kpos(int c, int g) { return 64 * c + 32 * (g & 1) + 8 * (g >> 1); }
  static __device__ __forceinline__ void load(Raw& r, const uint8_t* row, int64_t ch, int c) {
    const uint8_t* b = row + ch * 110;
    r.qs.load(b + 32 + 32 * (c >> 1), r.sh);
    r.hm.load(b, r.sh);
    const auto* h = reinterpret_cast<const uint16_t*>(b);
    auto word = [&](int i) { return static_cast<uint32_t>(__ldg(h + i)) | (static_cast<uint32_t>(__ldg(h + i + 1)) << 16); };
    r.lo = word(48 + 2 * (c & 1));  // scales[4 (c & 1) ..]
    r.hi = word(52);                // scales[8 .. 11]
    r.d = __ldg(h + 54);
  }
  // q3k_scale(scales, 4c + t): low nibble (c / 2) of scales[4 (c & 1) + t], high bits 2c of
  // scales[8 + t]; a = d (sc - 32), scaled by 4^-jp for the sub-blocks of bit pair jp = t / 2.
  static __device__ __forceinline__ void prep(const Raw& r, int c, Prep& p) {
    const float d = half_to_float(r.d);
    const uint32_t lo = r.lo >> (4 * (c >> 1)), hi = r.hi >> (2 * c);
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const int sc = static_cast<int>(((lo >> (8 * t)) & 0xF) | (((hi >> (8 * t)) & 3) << 4));
      p.a[t] = mul_rn(mul_rn(d, static_cast<float>(sc - 32)), t >= 2 ? 0.25f : 1.0f);
    }
  }
  template <int G>
  static __device__ __forceinline__ uint4 group(const Raw& r, Prep& p, int c) {
    constexpr int jp = G & 1, w = 2 * (G >> 1), t = 2 * jp + (G >> 2);  // bytes 4w .. 4w + 7, sub-block 4c + t
    const int rot = (2 * c - 2 - jp) & 31;  // hmask bit 2c + jp of each byte to bit 2 jp + 2
    constexpr uint32_t kq = 0x03030303u << (2 * jp), kh = 0x04040404u << (2 * jp);
    const uint32_t hlo = r.hm.word(w, r.sh), hhi = r.hm.word(w + 1, r.sh);
    // qs words shifted right by 4 (c & 1): the lane's bit pairs at bits 0-3 of each byte.
    const uint32_t lo = (r.qs.word(w, r.sh, 4 * (c & 1)) & kq) | (__funnelshift_r(hlo, hlo, rot) & kh);
    const uint32_t hi = (r.qs.word(w + 1, r.sh, 4 * (c & 1)) & kq) | (__funnelshift_r(hhi, hhi, rot) & kh);
    constexpr float kOff = jp ? 8388624.0f : 8388612.0f;  // 2^23 + 4^(jp + 1)
    float v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const uint32_t bits = __byte_perm(u < 4 ? lo : hi, 0x4B000000u, 0x7540u | (u & 3));
      v[u] = __fmul_rn(p.a[t], __fsub_rn(__uint_as_float(bits), kOff));
    }
    return round8<D>(v);
  }
};

// The tile's group G, for tiles whose group() needs the lane or not (Mxfp4Tile).
template <class Tile, int G>
__device__ __forceinline__ auto tile_group(const typename Tile::Raw& r, typename Tile::Prep& p, int c)
    -> decltype(Tile::template group<G>(r, p, c)) {
  return Tile::template group<G>(r, p, c);
}
template <class Tile, int G>
__device__ __forceinline__ auto tile_group(const typename Tile::Raw& r, typename Tile::Prep& p, int)
    -> decltype(Tile::template group<G>(r, p)) {
  return Tile::template group<G>(r, p);
}

// The next up to PASS (8 or 16) pairs of expert e at pair index >= from, in pair order: lane
// (g, c) gets the g-th in pa and, with PASS = 16, the (g + 8)-th in pb (-1 where there is none).
// Returns the index to continue from.
template <int PASS>
__device__ __forceinline__ int next_pass(const int32_t* s_ids, int P, int e, int from, int lane, int& pa, int& pb) {
  static_assert(PASS == kMmaPass || PASS == 2 * kMmaPass, "one or two n8 blocks per pass");
  const int ta = lane >> 2, tb = ta + kMmaPass;
  pa = pb = -1;
  int got = 0;
  for (int q0 = from; q0 < P; q0 += 32) {
    const int q = q0 + lane;
    const unsigned bal = __ballot_sync(0xffffffffu, q < P && s_ids[q] == e);
    const int cnt = __popc(bal);
    if (ta >= got && ta < got + cnt) pa = q0 + static_cast<int>(__fns(bal, 0, ta - got + 1));
    if (PASS > kMmaPass && tb >= got && tb < got + cnt) pb = q0 + static_cast<int>(__fns(bal, 0, tb - got + 1));
    if (got + cnt >= PASS) return q0 + static_cast<int>(__fns(bal, 0, PASS - got)) + 1;
    got += cnt;
  }
  return P;
}

__device__ __forceinline__ uint4 load_x8(const uint16_t* xrow, int64_t off) {
  return xrow ? __ldg(reinterpret_cast<const uint4*>(xrow + off)) : make_uint4(0, 0, 0, 0);
}

// Whether a tile has a rare variant (Tile::Rare) that mma_chunk runs where Tile::rare says so.
template <class T, class = void>
struct HasRare : std::false_type {};
template <class T>
struct HasRare<T, std::void_t<decltype(T::HAS_RARE)>> : std::bool_constant<T::HAS_RARE> {};

// One chunk of the warp's tile (rows g and g + 8 from ra and rb): decode the groups and run two
// mmas per group and n8 block of pairs (x: the first, into acc; x2: with PASS = 16, the second,
// into acc2, on the same decoded weights).
template <class Tile, DType D, int PASS>
__device__ __forceinline__ void mma_chunk_groups(float (&acc)[4], float (&acc2)[4], const typename Tile::Raw& ra,
                                                 const typename Tile::Raw& rb, const uint16_t* x, const uint16_t* x2,
                                                 int64_t ch, int c) {
  typename Tile::Prep pa, pb;
  Tile::prep(ra, c, pa);
  Tile::prep(rb, c, pb);
  const int64_t base = ch * (32 * Tile::GROUPS);
#define JAX_MOE_MMA_GROUP(G)                                                  \
  if constexpr (G < Tile::GROUPS) {                                           \
    const uint4 X = load_x8(x, base + Tile::kpos(c, G));                      \
    const uint4 wa = tile_group<Tile, G>(ra, pa, c);                          \
    const uint4 wb = tile_group<Tile, G>(rb, pb, c);                          \
    mma16816<D>(acc, wa.x, wb.x, wa.y, wb.y, X.x, X.y);                       \
    mma16816<D>(acc, wa.z, wb.z, wa.w, wb.w, X.z, X.w);                       \
    if constexpr (PASS > kMmaPass) {                                          \
      const uint4 X2 = load_x8(x2, base + Tile::kpos(c, G));                  \
      mma16816<D>(acc2, wa.x, wb.x, wa.y, wb.y, X2.x, X2.y);                  \
      mma16816<D>(acc2, wa.z, wb.z, wa.w, wb.w, X2.z, X2.w);                  \
    }                                                                         \
  }
  JAX_MOE_MMA_GROUP(0) JAX_MOE_MMA_GROUP(1) JAX_MOE_MMA_GROUP(2) JAX_MOE_MMA_GROUP(3)
  JAX_MOE_MMA_GROUP(4) JAX_MOE_MMA_GROUP(5) JAX_MOE_MMA_GROUP(6) JAX_MOE_MMA_GROUP(7)
#undef JAX_MOE_MMA_GROUP
}

// One chunk, as mma_chunk_groups. A tile with a rare variant (HasRare) runs it for the whole chunk
// where any lane's rows need it (Tile::rare on the raw bytes; a warp-uniform branch, so the common
// path carries none of the rare path's instructions).
template <class Tile, DType D, int PASS>
__device__ __forceinline__ void mma_chunk(float (&acc)[4], float (&acc2)[4], const typename Tile::Raw& ra,
                                          const typename Tile::Raw& rb, const uint16_t* x, const uint16_t* x2,
                                          int64_t ch, int c) {
  if constexpr (HasRare<Tile>::value) {
    if (__any_sync(0xffffffffu, Tile::rare(ra) || Tile::rare(rb))) {
      mma_chunk_groups<typename Tile::Rare, D, PASS>(acc, acc2, ra, rb, x, x2, ch, c);
      return;
    }
  }
  mma_chunk_groups<Tile, D, PASS>(acc, acc2, ra, rb, x, x2, ch, c);
}

// All chunks [ch0, ch1) of one pass, DEPTH chunks of weights loaded ahead, each holding all four
// lanes' elements.
template <class Tile, DType D, int PASS>
__device__ __forceinline__ void mma_pass_whole(float (&acc)[4], float (&acc2)[4], const uint8_t* rowa,
                                               const uint8_t* rowb, const uint16_t* x, const uint16_t* x2, int ch0,
                                               int ch1, int c) {
  constexpr int DEPTH = Tile::DEPTH;
  typename Tile::Raw ba[DEPTH], bb[DEPTH];
#pragma unroll
  for (int i = 0; i < DEPTH; ++i) {
    ba[i] = typename Tile::Raw{};
    bb[i] = typename Tile::Raw{};
    if (ch0 + i < ch1) {
      if (rowa) Tile::load(ba[i], rowa, ch0 + i, c);
      if (rowb) Tile::load(bb[i], rowb, ch0 + i, c);
    }
  }
  for (int ch = ch0; ch < ch1; ch += DEPTH) {
#pragma unroll
    for (int i = 0; i < DEPTH; ++i) {
      if (ch + i < ch1) {
        mma_chunk<Tile, D, PASS>(acc, acc2, ba[i], bb[i], x, x2, ch + i, c);
        const int next = ch + i + DEPTH;
        if (next < ch1) {
          if (rowa) Tile::load(ba[i], rowa, next, c);
          if (rowb) Tile::load(bb[i], rowb, next, c);
        }
      }
    }
  }
}

// All chunks [ch0, ch1) of one pass. TAIL: K % 256 != 0 (only tiles with PARTIAL_K are built with
// it): the chunks before `whole` (K / 256) run as above, and the last one, `whole`, holds lane c's
// elements (64c .. 64c + 63) only where `in_last`; elsewhere the lane reads nothing and feeds zeros
// for w and x. Keeping the partial chunk out of the loop keeps the loop's registers those of
// whole chunks.
template <class Tile, DType D, bool TAIL, int PASS>
__device__ __forceinline__ void mma_pass(float (&acc)[4], float (&acc2)[4], const uint8_t* rowa, const uint8_t* rowb,
                                         const uint16_t* x, const uint16_t* x2, int ch0, int ch1, int whole,
                                         bool in_last, int c) {
  if constexpr (!TAIL) {
    mma_pass_whole<Tile, D, PASS>(acc, acc2, rowa, rowb, x, x2, ch0, ch1, c);
  } else {
    mma_pass_whole<Tile, D, PASS>(acc, acc2, rowa, rowb, x, x2, ch0, min(ch1, whole), c);
    if (ch0 <= whole && whole < ch1) {
      typename Tile::Raw ra{}, rb{};
      if (in_last) {
        if (rowa) Tile::load(ra, rowa, whole, c);
        if (rowb) Tile::load(rb, rowb, whole, c);
      }
      mma_chunk<Tile, D, PASS>(acc, acc2, ra, rb, in_last ? x : nullptr, in_last ? x2 : nullptr, whole, c);
    }
  }
}

// Blocks per SM the kernel is compiled for: the tile's, or 2 (128 registers) with two n8 blocks.
template <class Tile, int PASS>
constexpr int mma_min_blocks() { return PASS > kMmaPass ? 2 : Tile::MIN_BLOCKS; }

// grid.x: tiles of 16 rows; grid.y: groups of a.group touched experts (ranked by expert id).
// PASS: pairs per pass, 8 (one n8 block) or 16 (two, on the same decoded weights).
template <class Tile, DType D, bool TAIL, int PASS>
__global__ void __launch_bounds__(kMmaMaxWarps * 32, (mma_min_blocks<Tile, PASS>())) mma_gemv_kernel(MmaGemvArgs a) {
  __shared__ int32_t s_ids[kMmaMaxPairs];
  __shared__ uint32_t s_bits[kMmaMaxE / 32];
  __shared__ int32_t s_rank[kMmaMaxE / 32];  // touched experts in the words before
  __shared__ int32_t s_touched;
  extern __shared__ float s_part[];  // [splits][P][16]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  const int P = static_cast<int>(a.T * a.k), words = static_cast<int>((a.E + 31) / 32);
  for (int i = tid; i < words; i += blockDim.x) s_bits[i] = 0;
  __syncthreads();
  for (int p = tid; p < P; p += blockDim.x) {
    const int32_t e = a.ids[p];
    const bool ok = valid_expert(e, a.E);
    s_ids[p] = ok ? e : -1;
    if (ok) atomicOr(&s_bits[e >> 5], 1u << (e & 31));  // integer OR: order-independent
  }
  __syncthreads();
  if (warp == 0) {
    int base = 0;
    for (int w0 = 0; w0 < words; w0 += 32) {
      const int cnt = w0 + lane < words ? __popc(s_bits[w0 + lane]) : 0;
      int incl = cnt;
      for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
      }
      if (w0 + lane < words) s_rank[w0 + lane] = base + incl - cnt;
      base += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) s_touched = base;
  }
  __syncthreads();
  const int touched = s_touched;
  const int u0 = static_cast<int>(blockIdx.y) * a.group;
  const int nu = min(a.group, touched - u0);  // this block's experts
  const int64_t n0 = int64_t{blockIdx.x} * kMmaRows;
  static_assert(32 * Tile::GROUPS == kMmaChunk, "a chunk is 256 elements, 64 per lane");
  const int chunks = static_cast<int>(TAIL ? (a.K + kMmaChunk - 1) / kMmaChunk : a.K / kMmaChunk);
  const int c = lane & 3, g = lane >> 2;
  // TAIL: the chunks before `whole` hold every lane's elements; the last holds lane c's where
  // in_last (K % 64 == 0, plan.h).
  const int whole = static_cast<int>(a.K / kMmaChunk);
  const bool in_last = TAIL && int64_t{whole} * kMmaChunk + 64 * c < a.K;
  const int64_t na = n0 + g, nb = n0 + g + 8;
  for (int item = warp; item < nu * a.splits; item += nwarps) {
    const int u = u0 + item / a.splits, s = item % a.splits;
    // The u-th touched expert: the word whose rank range holds u, then the bit.
    int e = 0;
    for (int w0 = 0; w0 < words; w0 += 32) {
      const int wi = w0 + lane;
      const bool here = wi < words && s_rank[wi] <= u && u < s_rank[wi] + __popc(s_bits[wi]);
      const unsigned bal = __ballot_sync(0xffffffffu, here);
      if (bal) {
        const int wsel = w0 + __ffs(bal) - 1;
        e = wsel * 32 + static_cast<int>(__fns(s_bits[wsel], 0, u - s_rank[wsel] + 1));
        break;
      }
    }
    const int ch0 = chunks * s / a.splits, ch1 = chunks * (s + 1) / a.splits;
    const auto* wb = static_cast<const uint8_t*>(a.w);
    const uint8_t* rowa = na < a.N ? wb + (e * a.N + na) * a.row_bytes : nullptr;
    const uint8_t* rowb = nb < a.N ? wb + (e * a.N + nb) * a.row_bytes : nullptr;
    for (int from = 0; from < P;) {
      int pa, pb;
      from = next_pass<PASS>(s_ids, P, e, from, lane, pa, pb);
      if (__ballot_sync(0xffffffffu, pa >= 0) == 0) break;
      const auto* x = static_cast<const uint16_t*>(a.x);
      const uint16_t* xa = pa >= 0 ? x + (a.x_per_pair ? pa : pa / a.k) * a.K : nullptr;
      const uint16_t* xb = pb >= 0 ? x + (a.x_per_pair ? pb : pb / a.k) * a.K : nullptr;
      float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, acc2[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      // A pass of 16 whose second n8 block is empty (the expert's last <= 8 pairs) runs as 8.
      const bool second = PASS > kMmaPass && __ballot_sync(0xffffffffu, pb >= 0) != 0;
      if (second)
        mma_pass<Tile, D, TAIL, PASS>(acc, acc2, rowa, rowb, xa, xb, ch0, ch1, whole, in_last, c);
      else
        mma_pass<Tile, D, TAIL, kMmaPass>(acc, acc2, rowa, rowb, xa, nullptr, ch0, ch1, whole, in_last, c);
      // acc[0..1]: rows g, acc[2..3]: rows g + 8, of pair slots 2c and 2c + 1 (acc2: 8 + 2c, 9 + 2c).
      float* part = s_part + int64_t{s} * P * kMmaRows;
      auto store = [&](const float (&v)[4], int slots) {
        const int p0 = __shfl_sync(0xffffffffu, slots, 8 * c), p1 = __shfl_sync(0xffffffffu, slots, 8 * c + 4);
        if (p0 >= 0) {
          part[p0 * kMmaRows + g] = v[0];
          part[p0 * kMmaRows + g + 8] = v[2];
        }
        if (p1 >= 0) {
          part[p1 * kMmaRows + g] = v[1];
          part[p1 * kMmaRows + g + 8] = v[3];
        }
      };
      store(acc, pa);
      if (second) store(acc2, pb);
    }
  }
  __syncthreads();
  // Splits in order, then (reduce) a token's pairs in order j = 0..k-1.
  auto dot = [&](int p, int r) {
    float d = 0.0f;
    for (int s = 0; s < a.splits; ++s) d += s_part[(int64_t{s} * P + p) * kMmaRows + r];
    return d;
  };
  // An expert's rank among the touched ones (which block group holds it).
  auto rank_of = [&](int e) { return s_rank[e >> 5] + __popc(s_bits[e >> 5] & ((1u << (e & 31)) - 1u)); };
  if (a.reduce) {
    for (int i = tid; i < a.T * kMmaRows; i += blockDim.x) {
      const int t = i / kMmaRows, r = i % kMmaRows;
      if (n0 + r >= a.N) continue;
      float acc = 0.0f;
      for (int j = 0; j < a.k; ++j) {
        const int p = static_cast<int>(t * a.k + j);
        if (s_ids[p] < 0) continue;
        acc += load_as_float(a.scores, p, a.score_dtype) * dot(p, r);
      }
      store_from_float(a.out, t * a.N + n0 + r, a.out_dtype, acc);
    }
  } else {
    for (int i = tid; i < P * kMmaRows; i += blockDim.x) {
      const int p = i / kMmaRows, r = i % kMmaRows;
      if (n0 + r >= a.N) continue;
      const int e = s_ids[p];
      if (e < 0) {
        if (blockIdx.y == 0) store_from_float(a.out, p * a.N + n0 + r, a.out_dtype, 0.0f);
        continue;
      }
      const int u = rank_of(e);
      if (u < u0 || u >= u0 + a.group) continue;
      store_from_float(a.out, p * a.N + n0 + r, a.out_dtype, load_as_float(a.scores, p, a.score_dtype) * dot(p, r));
    }
  }
}

// Host entry points (plan.h: mma_gemv_fits holds): GGUF experts, each format through its
// whole-block tile. The instantiations are split over two translation units, which compile in
// parallel: Q2_K, Q3_K and Q8_0 in mma_gguf.cu (launch_mma_gguf, which takes every format), Q4_K,
// Q5_K, Q6_K and MXFP4 in mma_gguf_wide.cu.
std::string launch_mma_gguf(const MoeProblem& p, const MoeBuffers& b, cudaStream_t stream);
std::string launch_mma_gguf_wide(const MoeProblem& p, const MoeBuffers& b, cudaStream_t stream);

// Launch mma_gemv_kernel<Tile, D> for problem p (plan.h: mma_gemv_fits holds).
template <class Tile, DType D>
std::string launch_mma_gemv(const MoeProblem& p, const MoeBuffers& b, cudaStream_t stream) {
  if (p.N == 0) return {};
  // What plan.h (mma_gemv_fits, mma_two_blocks) promised this kernel.
  if (p.pairs() > kMmaMaxPairs || !mma_gemv_k_fits(p.wtype, p.K) || (p.K % kMmaChunk != 0 && !Tile::PARTIAL_K) ||
      Tile::TWO_BLOCKS != mma_two_blocks(p.wtype))
    return "internal: mma_gemv_kernel cannot take " + std::to_string(p.pairs()) + " pairs at K = " + std::to_string(p.K);
  const int P = static_cast<int>(p.pairs());
  const int chunks = static_cast<int>((p.K + kMmaChunk - 1) / kMmaChunk);
  const int U = static_cast<int>(p.E < p.pairs() ? p.E : p.pairs());  // experts that can be touched
  // K splits. With reduce, a block holds all of a tile's experts (grid.y = 1) and its warps take the
  // (expert, split) items in turn: at least 4 chunks per item where K allows, which evens the warps
  // out when an expert or two is missing. Without reduce, splits only add blocks: the tiles built for
  // 3 blocks per SM split until the grid holds 1.5 waves of resident warps, since longer items keep
  // each warp's loads streaming (benchmarks/NOTES.md, v25); the others, with 16 warps per SM and
  // Q6_K one chunk ahead, keep the first rule (they measured slower without it). The
  // partials must fit in shared memory.
  int sms = 0;
  if (std::string err = multiprocessor_count(sms); !err.empty()) return "mma_gemv_kernel " + err;
  // Passes of 16 pairs (two n8 blocks on each decoded weight) where experts average more than 6
  // pairs, so that most of them are read and decoded once (benchmarks/NOTES.md, v28); else 8.
  const bool two = Tile::TWO_BLOCKS && p.pairs() > 6 * static_cast<int64_t>(U);
  const int min_blocks = two ? mma_min_blocks<Tile, 2 * kMmaPass>() : mma_min_blocks<Tile, kMmaPass>();
  const int64_t tiles = (p.N + kMmaRows - 1) / kMmaRows;
  const int64_t wave = int64_t{sms} * kMmaMaxWarps * min_blocks;  // resident warps, all SMs
  // Splits only while the partials stay within kMmaSplitPartialBytes (one split takes up to kMmaPartialBytes).
  auto fits = [&](int s) { return static_cast<int64_t>(s) * P * kMmaRows * 4 <= kMmaSplitPartialBytes; };
  auto group_of = [&](int s) { return p.reduce ? U : std::max(1, std::min(U, 8 / s)); };
  auto warps_of = [&](int s) {
    const int g = group_of(s);
    return tiles * ((U + g - 1) / g) * std::min(kMmaMaxWarps, g * s);
  };
  int splits = 1;
  if (p.reduce || min_blocks < 3) {
    while (splits * 2 <= chunks / 4 && splits * 2 <= 8 && fits(splits * 2)) splits *= 2;
  } else {
    while (splits * 2 <= chunks && splits * 2 <= 8 && fits(splits * 2) && 2 * warps_of(splits) < 3 * wave) splits *= 2;
  }
  const int group = group_of(splits);
  const int items = group * splits;
  const int warps = std::min(kMmaMaxWarps, std::max(1, items));
  MmaGemvArgs a{b.x, b.ids, b.w, b.scores, b.out, p.T, p.k, p.N, p.K, p.E,
                p.row_bytes(), p.score_dtype, p.out_dtype,
                p.reduce, p.x_per_pair, splits, group};
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>((U + group - 1) / group));
  const size_t smem = static_cast<size_t>(splits) * P * kMmaRows * sizeof(float);
  auto launch = [&](auto kernel) -> std::string {
    // Past the default 48 KiB of dynamic shared memory (over 768 pairs) the kernel must ask.
    if (smem > 48 * 1024) {
      const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kMmaPartialBytes);
      if (err != cudaSuccess) {
        cudaGetLastError();  // leave no error behind for a later launch to report as its own
        return std::string("mma_gemv_kernel shared memory: ") + cudaGetErrorString(err);
      }
    }
    kernel<<<grid, warps * 32, smem, stream>>>(a);
    return launch_error("mma_gemv_kernel");
  };
  constexpr int TWO = Tile::TWO_BLOCKS ? 2 * kMmaPass : kMmaPass;  // (no 16-pair kernel where it would spill)
  if (p.K % kMmaChunk == 0)
    return two ? launch(mma_gemv_kernel<Tile, D, false, TWO>) : launch(mma_gemv_kernel<Tile, D, false, kMmaPass>);
  if constexpr (Tile::PARTIAL_K)
    return two ? launch(mma_gemv_kernel<Tile, D, true, TWO>) : launch(mma_gemv_kernel<Tile, D, true, kMmaPass>);
  return "internal: mma_gemv_kernel without a partial last chunk for K = " + std::to_string(p.K);
}

}  // namespace jax_moe
