#pragma once

#include "xla/ffi/api/c_api.h"

namespace jax_moe {
// XLA FFI handler of the `jax_moe_matmul` target on the CUDA platform.
extern "C" XLA_FFI_Error* MoeMatmulCuda(XLA_FFI_CallFrame* call_frame);
}  // namespace jax_moe
