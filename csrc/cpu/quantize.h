// Host quantizers for the GGUF block formats (docs/contract.md §3).
#pragma once

#include <cstdint>

#include "../common/gguf_blocks.h"

namespace jax_moe {

// Quantize one row of `k` floats (k a multiple of the format's block size) into k / QK blocks
// at `dst`. Single-threaded; the codec parallelizes over rows. Q8_0 is bit-exact with ggml's
// reference quantizer (and gguf.quants.quantize), MXFP4 with gguf.quants.quantize; the K-quants follow ggml's reference error.
void quantize_row(GGMLType t, const float* src, int64_t k, void* dst);

}  // namespace jax_moe
