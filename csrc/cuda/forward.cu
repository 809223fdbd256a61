// The CUDA forward of one validated call: the plan (plan.h) picks the kernel and tile; this file
// runs them in order.
#include "grouped_gemm.cuh"
#include "kernels.h"

namespace jax_moe {

CudaDevice current_device() {
  CudaDevice d;
#if defined(JAX_MOE_HAS_SM90A)
  d.sm90a_build = true;
#endif
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&d.cc_minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    cudaGetLastError();  // leave no sticky error behind; the portable kernels serve
    d.cc_major = d.cc_minor = 0;
  }
  return d;
}

bool aligned16(const MoeBuffers& b) {
  return reinterpret_cast<uintptr_t>(b.x) % 16 == 0 && reinterpret_cast<uintptr_t>(b.w) % 16 == 0;
}

namespace {

// The grouped GEMM's arguments: pairs grouped by expert in scratch, per-pair f32 partials when
// reducing.
GemmArgs gemm_args(const MoeProblem& p, const MoeBuffers& b, uint8_t* scratch, const ScratchLayout& s) {
  GemmArgs a{};
  a.x = b.x;
  a.w = b.w;
  a.scores = b.scores;
  a.out = p.reduce ? nullptr : b.out;
  a.partial = p.reduce ? reinterpret_cast<float*>(scratch + s.partial) : nullptr;
  a.offsets = reinterpret_cast<const int32_t*>(scratch + s.offsets);
  a.tile_start = reinterpret_cast<const int32_t*>(scratch + s.tile_start);
  a.perm = reinterpret_cast<const int32_t*>(scratch + s.perm);
  a.T = p.T; a.k = p.k; a.N = p.N; a.K = p.K; a.E = p.E;
  a.row_bytes = p.kind == MoeKind::WMMA_GGUF ? p.row_bytes() : 0;
  a.score_dtype = p.score_dtype;
  a.out_dtype = p.out_dtype;
  a.x_per_pair = p.x_per_pair;
  a.vec = p.K % 8 == 0 && reinterpret_cast<uintptr_t>(b.x) % 16 == 0 &&
          (p.kind != MoeKind::WMMA || reinterpret_cast<uintptr_t>(b.w) % 16 == 0);
  a.vec_out = p.N % 8 == 0 && (p.reduce || ((p.out_dtype == DType::BF16 || p.out_dtype == DType::F16) &&
                                              reinterpret_cast<uintptr_t>(b.out) % 16 == 0));
  return a;
}

std::string launch_grouped(const MoeProblem& p, const MoeBuffers& b, const CudaPlan& plan, uint8_t* scratch,
                           const ScratchLayout& s, cudaStream_t stream) {
  if (auto e = group_pairs_by_expert(p, b.ids, scratch, s, plan.tile_m, stream); !e.empty()) return e;
  if (p.pairs() > 0 && p.N > 0) {
    const GemmArgs a = gemm_args(p, b, scratch, s);
    std::string e;
    switch (plan.kernel) {
      case CudaKernel::kWgmma: e = launch_wgmma(p, a, plan, stream); break;
      case CudaKernel::kWgmmaGguf: e = launch_wgmma_gguf(p, a, plan, stream); break;
      default: e = launch_wmma(p, a, plan, stream); break;
    }
    if (!e.empty()) return e;
  }
  if (p.reduce) return launch_reduce_pairs(p, b, reinterpret_cast<const float*>(scratch + s.partial), stream);
  return launch_zero_invalid_pairs(p, b, stream);
}

}  // namespace

CudaStatus moe_forward_cuda(const MoeProblem& p, const MoeBuffers& b, const CudaDevice& dev, uint8_t* scratch,
                            size_t scratch_bytes, cudaStream_t stream) {
  const CudaPlan plan = plan_call(p, dev, aligned16(b));
  const ScratchLayout s = scratch_layout(p, plan);
  if (scratch_bytes < s.total)
    return CudaStatus::invalid_argument("scratch buffer of " + std::to_string(scratch_bytes) +
                                        " bytes is smaller than the " + std::to_string(s.total) +
                                        " this call needs");
  if (p.kind == MoeKind::SCALAR_GGUF) return CudaStatus::launched(launch_scalar_gguf(p, b, scratch, s, stream));
  if (plan.kernel == CudaKernel::kMmaGemv) return CudaStatus::launched(launch_mma_gguf(p, b, stream));
  if (plan.kernel == CudaKernel::kTokenGemv) return CudaStatus::launched(launch_small_t(p, b, stream));
  return CudaStatus::launched(launch_grouped(p, b, plan, scratch, s, stream));
}

}  // namespace jax_moe
