// CPU implementation of the three kinds.
//
// Tokens are processed in chunks. Within a chunk the valid routed pairs are sorted by expert; each
// work item is (expert, tile of weight rows): the tile is brought to the form its kind computes
// with (f32 rows for WMMA, decoded-and-rounded f32 rows for WMMA_GGUF, raw blocks for
// SCALAR_GGUF) once, then applied to every pair routed to that expert, writing
// score * dot into an f32 buffer. The reduction over k then runs in the order j = 0..k-1 and
// the result is rounded once to the output dtype.
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
constexpr int64_t kChunkFloats = int64_t{1} << 24;  // f32 results held per token chunk (64 MB)

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
  std::vector<block_q8_1> q8;
};

StagedX stage_x(const MoeProblem& p, const void* x) {
  StagedX s;
  const int64_t rows = p.x_rows(), K = p.K;
  if (p.kind == MoeKind::SCALAR_GGUF) {
    const int64_t nb = K / QK8_1;
    s.q8.resize(static_cast<size_t>(rows * nb));
    const float* xf = static_cast<const float*>(x);
    parallel_for(rows * nb, 256, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const float* src = xf + b * QK8_1;  // blocks of a row are contiguous, rows too
        stage_q8_1([src](int i) { return src[i]; }, s.q8[static_cast<size_t>(b)]);
      }
    });
  } else {
    s.f32.resize(static_cast<size_t>(rows * K));
    parallel_for(rows * K, 1 << 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) s.f32[static_cast<size_t>(i)] = load_as_float(x, i, p.x_dtype);
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
float dot_row_q8_1(const MoeProblem& p, const uint8_t* wrow, const block_q8_1* xq) {
  float acc = 0.0f;
  dispatch_format(p.wtype, [&](auto fmt) {
    using F = decltype(fmt);
    const auto* blocks = reinterpret_cast<const typename F::Block*>(wrow);
    const int64_t nb = p.K / F::QK;
    for (int64_t b = 0; b < nb; ++b) acc += dot_block_q8_1<F>(blocks[b], xq + b * (F::QK / QK8_1));
  });
  return acc;
}

}  // namespace

void moe_forward_cpu(const MoeProblem& p, const MoeBuffers& buf) {
  const int64_t T = p.T, k = p.k, N = p.N, K = p.K, E = p.E;
  const int64_t out_elems = p.reduce ? T * N : T * k * N;
  if (out_elems == 0) return;
  const StagedX xs = stage_x(p, buf.x);

  const int64_t per_token = std::max<int64_t>(1, k * N);
  const int64_t chunk_tokens = std::max<int64_t>(1, kChunkFloats / per_token);
  std::vector<float> acc;
  // Valid pairs of a chunk sorted by expert (stable: pair order within an expert), and the runs
  // of one expert in that order. Nothing here is sized by E, so a call with many empty experts
  // costs only what its pairs cost.
  struct Run {
    int64_t expert, begin, end;
  };
  std::vector<std::pair<int32_t, int64_t>> sorted;
  std::vector<Run> runs;

  for (int64_t t0 = 0; t0 < T; t0 += chunk_tokens) {
    const int64_t t1 = std::min(T, t0 + chunk_tokens);
    const int64_t p0 = t0 * k, p1 = t1 * k;
    acc.assign(static_cast<size_t>((p1 - p0) * N), 0.0f);

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
    const int64_t tiles = (N + kTileRows - 1) / kTileRows;

    parallel_dynamic<Tile>(static_cast<int64_t>(runs.size()) * tiles, [&](int64_t item, Tile& tile) {
      const Run& run = runs[static_cast<size_t>(item / tiles)];
      const int64_t e = run.expert;
      const int64_t n0 = (item % tiles) * kTileRows, rows = std::min(kTileRows, N - n0);
      const bool scalar = p.kind == MoeKind::SCALAR_GGUF;
      if (!scalar) load_tile(p, buf.w, e, n0, rows, tile);
      for (int64_t o = run.begin; o < run.end; ++o) {
        const int64_t q = sorted[static_cast<size_t>(o)].second;
        const float s = load_as_float(buf.scores, q, p.score_dtype);
        const int64_t xr = p.x_row(q);
        float* dst = acc.data() + (q - p0) * N + n0;
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

    // Reduce over k in order and round once to the output dtype.
    parallel_for(t1 - t0, 16, [&](int64_t a, int64_t b) {
      for (int64_t t = t0 + a; t < t0 + b; ++t) {
        if (p.reduce) {
          for (int64_t n = 0; n < N; ++n) {
            float sum = 0.0f;
            for (int64_t j = 0; j < k; ++j)
              if (valid_id(buf.ids[t * k + j], E)) sum += acc[static_cast<size_t>((t * k + j - p0) * N + n)];
            store_from_float(buf.out, t * N + n, p.out_dtype, sum);
          }
        } else {
          for (int64_t j = 0; j < k; ++j)
            for (int64_t n = 0; n < N; ++n) {
              const int64_t q = t * k + j;
              const float v = valid_id(buf.ids[q], E) ? acc[static_cast<size_t>((q - p0) * N + n)] : 0.0f;
              store_from_float(buf.out, q * N + n, p.out_dtype, v);
            }
        }
      }
    });
  }
}

}  // namespace jax_moe
