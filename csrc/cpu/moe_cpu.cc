// CPU implementation of the three kinds.
//
// The work is cut into chunks of (token, expert) pairs and of output columns so that the host
// scratch stays within a fixed budget whatever T, k, N and K are (kScratchFloats f32 results,
// kChunkPairs sorted pairs, about kScratchFloats staged activation values). Within a chunk the
// valid routed pairs are sorted by expert; each work item is (expert, tile of weight rows): the
// tile is brought to the form its kind computes with (f32 rows for WMMA, decoded-and-rounded f32
// rows for WMMA_GGUF, raw blocks for SCALAR_GGUF) once, then applied to every pair routed to that
// expert, writing score * dot into an f32 buffer. The reduction over k then runs in the order
// j = 0..k-1 (a token whose k pairs span chunks carries its partial sums to the next chunk, in
// the same order) and the result is rounded once to the output dtype.
#include "moe_cpu.h"

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "../common/gguf_formats.h"
#include "../common/q8_1.h"
#include "parallel.h"

namespace jax_moe {
namespace {

constexpr int64_t kTileRows = 16;
constexpr int64_t kScratchFloats = int64_t{1} << 24;  // f32 results (and staged x values) held at a time: 64 MB
constexpr int64_t kChunkPairs = int64_t{1} << 20;     // pairs sorted at a time: 16 MB

// Dot product with eight running sums (a fixed order, so results are reproducible).
float dot_f32(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  float tail = 0.0f;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

bool valid_id(int32_t id, int64_t E) { return id >= 0 && id < E; }

struct Tile {
  std::vector<float> w;  // [kTileRows, K] f32 weight rows (WMMA kinds)
};

// Staged activations: f32 rows (WMMA kinds) or q8_1 blocks (SCALAR_GGUF).
struct StagedX {
  std::vector<float> f32;
  std::vector<q8_1_staged> q8;
};

// Stage rows [r0, r1) of x.
StagedX stage_x(const MoeProblem& p, const void* x, int64_t r0, int64_t r1) {
  StagedX s;
  const int64_t rows = r1 - r0, K = p.K;
  if (p.kind == MoeKind::SCALAR_GGUF) {
    const int64_t nb = K / QK8_1;
    s.q8.resize(static_cast<size_t>(rows * nb));
    const float* xf = static_cast<const float*>(x) + r0 * K;
    parallel_for(rows * nb, 256, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const float* src = xf + b * QK8_1;  // blocks of a row are contiguous, rows too
        stage_q8_1([src](int i) { return src[i]; }, s.q8[static_cast<size_t>(b)]);
      }
    });
  } else {
    s.f32.resize(static_cast<size_t>(rows * K));
    parallel_for(rows * K, 1 << 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) s.f32[static_cast<size_t>(i)] = load_as_float(x, r0 * K + i, p.x_dtype);
    });
  }
  return s;
}

// Fill tile rows [n0, n0 + rows) of expert e as f32 (WMMA and WMMA_GGUF).
void load_tile(const MoeProblem& p, const void* w, int64_t e, int64_t n0, int64_t rows, Tile& t) {
  const int64_t K = p.K, N = p.N;
  t.w.resize(static_cast<size_t>(kTileRows * K));
  float* dst = t.w.data();
  if (p.kind == MoeKind::WMMA) {
    const DType wt = p.x_dtype;
    if (p.layout == WeightLayout::ENK) {
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t kk = 0; kk < K; ++kk)
          dst[r * K + kk] = load_as_float(w, (e * N + n0 + r) * K + kk, wt);
    } else {
      for (int64_t kk = 0; kk < K; ++kk)
        for (int64_t r = 0; r < rows; ++r)
          dst[r * K + kk] = load_as_float(w, (e * K + kk) * N + n0 + r, wt);
    }
    return;
  }
  dispatch_format(p.wtype, [&](auto fmt) {
    using F = decltype(fmt);
    const auto* base = static_cast<const uint8_t*>(w);
    const int64_t nb = K / F::QK;
    for (int64_t r = 0; r < rows; ++r) {
      const auto* blocks =
          reinterpret_cast<const typename F::Block*>(base + (e * N + n0 + r) * p.row_bytes());
      float* row = dst + r * K;
      for (int64_t b = 0; b < nb; ++b) decode_block<F>(blocks[b], row + b * F::QK);
      for (int64_t kk = 0; kk < K; ++kk) row[kk] = round_to(p.x_dtype, row[kk]);
    }
  });
}

// One SCALAR_GGUF weight row against one staged activation row.
float dot_row_q8_1(const MoeProblem& p, const uint8_t* wrow, const q8_1_staged* xq) {
  float acc = 0.0f;
  dispatch_format(p.wtype, [&](auto fmt) {
    using F = decltype(fmt);
    const auto* blocks = reinterpret_cast<const typename F::Block*>(wrow);
    const int64_t nb = p.K / F::QK;
    for (int64_t b = 0; b < nb; ++b) acc += dot_block_q8_1<F>(blocks[b], xq + b * (F::QK / QK8_1));
  });
  return acc;
}

// How a call is cut: `cols` output columns per pass over the pairs, `pairs` pairs per chunk (whole
// tokens when a token's k * cols results fit the budget, else part of one token).
struct Chunking {
  int64_t cols, pairs;
};

Chunking chunking(const MoeProblem& p) {
  const int64_t k = p.k, N = p.N, K = std::max<int64_t>(1, p.K);
  Chunking c;
  c.cols = k * N <= kScratchFloats
               ? N
               : std::min(N, std::max(kTileRows, kScratchFloats / k / kTileRows * kTileRows));
  c.pairs = std::min(kChunkPairs, std::max<int64_t>(1, kScratchFloats / std::max<int64_t>(1, c.cols)));
  // Staged x: one row per pair, or per token.
  const int64_t x_rows = std::max<int64_t>(1, kScratchFloats / K);
  c.pairs = std::min(c.pairs, p.x_per_pair ? x_rows : x_rows * k);
  if (c.pairs >= k) c.pairs = c.pairs / k * k;
  return c;
}

}  // namespace

void moe_forward_cpu(const MoeProblem& p, const MoeBuffers& buf) {
  const int64_t T = p.T, k = p.k, N = p.N, K = p.K, E = p.E, P = T * k;
  const int64_t out_elems = p.reduce ? T * N : T * k * N;
  if (out_elems == 0) return;
  const Chunking ch = chunking(p);

  std::vector<float> acc, carry_in, carry_out;  // carry: partial sums of a token cut by a chunk
  // Valid pairs of a chunk sorted by expert (stable: pair order within an expert), and the runs
  // of one expert in that order. Nothing here is sized by E, so a call with many empty experts
  // costs only what its pairs cost.
  struct Run {
    int64_t expert, begin, end;
  };
  std::vector<std::pair<int32_t, int64_t>> sorted;
  std::vector<Run> runs;

  for (int64_t c0 = 0; c0 < N; c0 += ch.cols) {
    const int64_t c1 = std::min(N, c0 + ch.cols), nc = c1 - c0;
    carry_in.assign(static_cast<size_t>(nc), 0.0f);
    carry_out.assign(static_cast<size_t>(nc), 0.0f);
    for (int64_t p0 = 0; p0 < P; p0 += ch.pairs) {
      const int64_t p1 = std::min(P, p0 + ch.pairs);
      const int64_t r0 = p.x_row(p0), r1 = p.x_row(p1 - 1) + 1;
      const StagedX xs = stage_x(p, buf.x, r0, r1);
      acc.assign(static_cast<size_t>((p1 - p0) * nc), 0.0f);

      sorted.clear();
      for (int64_t q = p0; q < p1; ++q)
        if (valid_id(buf.ids[q], E)) sorted.emplace_back(buf.ids[q], q);
      std::stable_sort(sorted.begin(), sorted.end(),
                       [](const auto& a, const auto& b) { return a.first < b.first; });
      runs.clear();
      for (size_t i = 0; i < sorted.size(); ++i) {
        if (i == 0 || sorted[i].first != sorted[i - 1].first)
          runs.push_back({sorted[i].first, static_cast<int64_t>(i), static_cast<int64_t>(i)});
        runs.back().end = static_cast<int64_t>(i) + 1;
      }
      const int64_t tiles = (nc + kTileRows - 1) / kTileRows;

      parallel_dynamic<Tile>(static_cast<int64_t>(runs.size()) * tiles, [&](int64_t item, Tile& tile) {
        const Run& run = runs[static_cast<size_t>(item / tiles)];
        const int64_t e = run.expert;
        const int64_t n0 = c0 + (item % tiles) * kTileRows, rows = std::min(kTileRows, c1 - n0);
        const bool scalar = p.kind == MoeKind::SCALAR_GGUF;
        if (!scalar) load_tile(p, buf.w, e, n0, rows, tile);
        for (int64_t o = run.begin; o < run.end; ++o) {
          const int64_t q = sorted[static_cast<size_t>(o)].second;
          const float s = load_as_float(buf.scores, q, p.score_dtype);
          const int64_t xr = p.x_row(q) - r0;
          float* dst = acc.data() + (q - p0) * nc + (n0 - c0);
          for (int64_t r = 0; r < rows; ++r) {
            float d;
            if (scalar) {
              const auto* wrow = static_cast<const uint8_t*>(buf.w) + (e * N + n0 + r) * p.row_bytes();
              d = dot_row_q8_1(p, wrow, xs.q8.data() + xr * (K / QK8_1));
            } else {
              d = dot_f32(tile.w.data() + r * K, xs.f32.data() + xr * K, K);
            }
            dst[r] = s * d;
          }
        }
      });

      // Reduce over k in order and round once to the output dtype. The first token of the chunk
      // may have begun in the previous chunk (its sums so far are in carry_in), the last may
      // end in the next (its sums go to carry_out).
      const int64_t t_first = p0 / k, t_last = (p1 - 1) / k;
      parallel_for(t_last - t_first + 1, 16, [&](int64_t a, int64_t b) {
        for (int64_t t = t_first + a; t < t_first + b; ++t) {
          const int64_t q0 = std::max(t * k, p0), q1 = std::min(t * k + k, p1);
          if (p.reduce) {
            const bool begun = t * k < p0, ends = t * k + k <= p1;
            for (int64_t n = 0; n < nc; ++n) {
              float sum = begun ? carry_in[static_cast<size_t>(n)] : 0.0f;
              for (int64_t q = q0; q < q1; ++q)
                if (valid_id(buf.ids[q], E)) sum += acc[static_cast<size_t>((q - p0) * nc + n)];
              if (ends)
                store_from_float(buf.out, t * N + c0 + n, p.out_dtype, sum);
              else
                carry_out[static_cast<size_t>(n)] = sum;
            }
          } else {
            for (int64_t q = q0; q < q1; ++q)
              for (int64_t n = 0; n < nc; ++n) {
                const float v = valid_id(buf.ids[q], E) ? acc[static_cast<size_t>((q - p0) * nc + n)] : 0.0f;
                store_from_float(buf.out, q * N + c0 + n, p.out_dtype, v);
              }
          }
        }
      });
      std::swap(carry_in, carry_out);
    }
  }
}

}  // namespace jax_moe
