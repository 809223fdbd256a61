// Whole-tensor GGUF encode/decode on the host, threaded over rows.
#pragma once

#include <cstdint>

#include "../common/gguf_blocks.h"

namespace jax_moe {

// Quantize rows x k floats into rows x (k / QK * block_bytes) bytes.
void quantize_rows(GGMLType t, const float* src, int64_t rows, int64_t k, uint8_t* dst);
// Decode rows x (k / QK * block_bytes) bytes into rows x k floats (bit-exact with ggml).
void dequantize_rows(GGMLType t, const uint8_t* src, int64_t rows, int64_t k, float* dst);

}  // namespace jax_moe
