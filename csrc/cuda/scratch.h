// Layout of the device scratch buffer that XLA allocates for the CUDA handler as a hidden extra
// output (DESIGN.md §5: handlers never allocate). Host-only, plain C++: the Python lowering asks
// the CUDA module for scratch_bytes() and the handler checks the buffer against the same layout.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../common/gguf_blocks.h"
#include "../common/moe_problem.h"

namespace jax_moe {

struct ScratchLayout {
  // Byte offsets; each region 256-byte aligned.
  size_t counts = 0;      // int32 [E]      pairs per expert
  size_t offsets = 0;     // int32 [E + 1]  first sorted position of each expert
  size_t tile_start = 0;  // int32 [E + 1]  first M tile of each expert in the grouped GEMM
  size_t cursor = 0;      // int32 [E]      scatter cursors
  size_t perm = 0;        // int32 [T * k]  pairs sorted by expert
  size_t partial = 0;     // f32 [T * k, N] per-pair results, when reducing on the WMMA path
  size_t staged = 0;      // block_q8_1 [x_rows, K / 32], SCALAR_GGUF's staged activations
  size_t decoded = 0;     // x-dtype [E, N, K]: GGUF experts decoded once, at large T
  size_t total = 0;
};

inline size_t align256(size_t n) { return (n + 255) & ~size_t{255}; }

// WMMA_GGUF's grouped GEMM (T > 4 and more than one pair per expert on average: see
// use_token_gemv) first decodes the experts once into scratch, rounded to x's dtype, and runs the
// dense GEMM on them. On the H200 (benchmarks/NOTES.md) that beat decoding inside the GEMM at
// every size measured, by 1.2-6x. The price is transient memory: E * N * K * 2 bytes of scratch,
// the size of the experts in bf16. (Where the GEMV serves 1-2 pairs per expert on GPUs other
// than Hopper, that space goes unused.)
inline bool gguf_decode_first(MoeKind kind, int64_t T, int64_t k, int64_t E) {
  return kind == MoeKind::WMMA_GGUF && E > 0 && T > 4 && T * k > E;
}

inline ScratchLayout scratch_layout(MoeKind kind, int64_t T, int64_t k, int64_t E, int64_t N,
                                    int64_t K, int64_t x_rows, bool reduce) {
  ScratchLayout s;
  size_t at = 0;
  auto take = [&at](size_t bytes) {
    const size_t here = at;
    at += align256(bytes);
    return here;
  };
  const size_t pairs = static_cast<size_t>(T * k);
  if (kind == MoeKind::SCALAR_GGUF) {
    s.staged = take(static_cast<size_t>(x_rows * (K / 32)) * sizeof(block_q8_1));
  } else {
    s.counts = take(sizeof(int32_t) * static_cast<size_t>(E));
    s.offsets = take(sizeof(int32_t) * static_cast<size_t>(E + 1));
    s.tile_start = take(sizeof(int32_t) * static_cast<size_t>(E + 1));
    s.cursor = take(sizeof(int32_t) * static_cast<size_t>(E));
    s.perm = take(sizeof(int32_t) * pairs);
    if (reduce) s.partial = take(sizeof(float) * pairs * static_cast<size_t>(N));
    if (gguf_decode_first(kind, T, k, E)) s.decoded = take(sizeof(uint16_t) * static_cast<size_t>(E * N * K));
  }
  s.total = at;
  return s;
}

inline ScratchLayout scratch_layout(const MoeProblem& p) {
  return scratch_layout(p.kind, p.T, p.k, p.E, p.N, p.K, p.x_rows(), p.reduce);
}

}  // namespace jax_moe
