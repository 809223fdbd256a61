// Layout of the device scratch buffer that XLA allocates for the CUDA handler as a hidden extra
// output (docs/contract.md §5: handlers never allocate). Host-only, plain C++: the Python lowering asks
// the CUDA module for scratch_bytes() and the handler checks the buffer against the same layout.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../common/gguf_blocks.h"
#include "../common/q8_1.h"
#include "../common/moe_problem.h"
#include "plan.h"

namespace jax_moe {

struct ScratchLayout {
  // Byte offsets; each region 256-byte aligned.
  size_t counts = 0;      // int32 [E]      pairs per expert
  size_t offsets = 0;     // int32 [E + 1]  first sorted position of each expert
  size_t tile_start = 0;  // int32 [E + 1]  first M tile of each expert in the grouped GEMM
  size_t cursor = 0;      // int32 [E]      scatter cursors
  size_t perm = 0;        // int32 [T * k]  pairs sorted by expert
  size_t partial = 0;     // f32 [T * k, N] per-pair results, when the grouped GEMM reduces
  size_t staged = 0;      // q8_1_staged [x_rows, K / 32], SCALAR_GGUF's staged activations
  size_t total = 0;
};

inline size_t align256(size_t n) { return (n + 255) & ~size_t{255}; }

// What the plan's kernels need: O(T * k * N) plus O(E) bookkeeping, whatever E * N * K is (GGUF
// experts are decoded inside the kernels, never into scratch).
inline ScratchLayout scratch_layout(const MoeProblem& p, const CudaPlan& plan) {
  ScratchLayout s;
  size_t at = 0;
  auto take = [&at](size_t bytes) {
    const size_t here = at;
    at += align256(bytes);
    return here;
  };
  const size_t pairs = static_cast<size_t>(p.pairs());
  if (p.kind == MoeKind::SCALAR_GGUF)
    s.staged = take(static_cast<size_t>(p.x_rows() * (p.K / 32)) * sizeof(q8_1_staged));
  if (plan.grouped()) {
    s.counts = take(sizeof(int32_t) * static_cast<size_t>(p.E));
    s.offsets = take(sizeof(int32_t) * static_cast<size_t>(p.E + 1));
    s.tile_start = take(sizeof(int32_t) * static_cast<size_t>(p.E + 1));
    s.cursor = take(sizeof(int32_t) * static_cast<size_t>(p.E));
    s.perm = take(sizeof(int32_t) * pairs);
    if (p.reduce) s.partial = take(sizeof(float) * pairs * static_cast<size_t>(p.N));
  }
  s.total = at;
  return s;
}

// Scratch the lowering allocates, before it knows which GPU runs the call and where its buffers
// start: enough for the plan of any device class (Hopper with wgmma, a tensor-core GPU without
// it, or neither) and either alignment.
inline size_t scratch_bytes_any_device(const MoeProblem& p) {
  CudaDevice hopper, ampere, other;
  hopper.cc_major = 9;
  hopper.sm90a_build = true;
  ampere.cc_major = 8;
  size_t most = 0;
  for (const CudaDevice& d : {hopper, ampere, other})
    for (bool aligned : {true, false}) {
      const size_t n = scratch_layout(p, plan_call(p, d, aligned)).total;
      most = n > most ? n : most;
    }
  return most;
}

}  // namespace jax_moe
