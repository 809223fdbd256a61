// The CUDA forward of one validated call: which kernels run, in which order, for each kind.
#include "kernels.h"

namespace jax_moe {

std::string moe_forward_cuda(const MoeProblem& p, const MoeBuffers& b, uint8_t* scratch,
                             size_t scratch_bytes, cudaStream_t stream) {
  const ScratchLayout s = scratch_layout(p);
  if (scratch_bytes < s.total)
    return "scratch buffer of " + std::to_string(scratch_bytes) + " bytes is smaller than the " +
           std::to_string(s.total) + " this call needs";
  if (p.kind == MoeKind::SCALAR_GGUF) return launch_scalar_gguf(p, b, scratch, s, stream);
  const bool hopper = wgmma_device();
  if (use_token_gemv(p, hopper)) return launch_small_t(p, b, stream);
  if (auto e = launch_wmma(p, b, scratch, s, hopper, stream); !e.empty()) return e;
  if (p.reduce) return launch_reduce_pairs(p, b, reinterpret_cast<const float*>(scratch + s.partial), stream);
  return launch_zero_invalid_pairs(p, b, stream);
}

}  // namespace jax_moe
