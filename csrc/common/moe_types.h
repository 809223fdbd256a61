// The enums of the moe_matmul ABI (their values are the FFI attributes' and jax_moe's Python
// enums'): which kernel kind, which weight layout, which element type. One home for the types
// every other header shares; GGUF format ids (GGMLType) live with the formats in gguf_blocks.h.
#pragma once

#include <cstdint>

namespace jax_moe {

// MoE kernel kinds (mirrored by jax_moe.MoeKind).
enum class MoeKind : int32_t { SCALAR_GGUF = 0, WMMA = 1, WMMA_GGUF = 2 };

// Weight layouts of dense experts: [E, N, K] (GGUF's own) or [E, K, N] (Flax kernels).
enum class WeightLayout : int32_t { ENK = 0, EKN = 1 };

// Element types of activations, scores and outputs.
enum class DType : int32_t { F32 = 0, F16 = 1, BF16 = 2 };

}  // namespace jax_moe
