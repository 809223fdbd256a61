// One MoE projection call, as every kernel (CPU and CUDA) sees it after validation.
#pragma once

#include <cstdint>

#include "fp16.h"
#include "gguf_blocks.h"
#include "moe_types.h"

namespace jax_moe {

struct MoeProblem {
  MoeKind kind = MoeKind::WMMA;
  GGMLType wtype = GGMLType::BF16;  // F16 / BF16 for dense experts, else the GGUF format
  WeightLayout layout = WeightLayout::ENK;
  bool reduce = true;
  bool x_per_pair = false;  // x is [T, k, K] (each pair reads its own row) instead of [T, K]
  DType x_dtype = DType::BF16, score_dtype = DType::F32, out_dtype = DType::BF16;
  int64_t T = 0, k = 0, K = 0, N = 0, E = 0;

  int64_t pairs() const { return T * k; }
  int64_t x_rows() const { return x_per_pair ? T * k : T; }
  // Row of x that pair p = t * k + j reads.
  int64_t x_row(int64_t p) const { return x_per_pair ? p : p / k; }
  // Bytes of one weight row (N index) of one expert, quantized formats only.
  int64_t row_bytes() const { return K / block_elems(wtype) * block_bytes(wtype); }
};

// Raw buffer pointers of one call; shapes and dtypes are in MoeProblem.
struct MoeBuffers {
  const void* x = nullptr;      // [T, K] or [T, k, K], x_dtype
  const int32_t* ids = nullptr;  // [T, k]
  const void* w = nullptr;      // dense [E, N, K] / [E, K, N], or GGUF bytes [E, N, row_bytes]
  const void* scores = nullptr;  // [T, k], score_dtype
  void* out = nullptr;          // [T, N] (reduce) or [T, k, N], out_dtype
};

}  // namespace jax_moe
