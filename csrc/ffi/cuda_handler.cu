// The CUDA FFI handler of moe_matmul: validate, then launch on XLA's stream. CUDA-graph safe:
// no allocation (scratch is an extra output buffer), no synchronization, no host reads of device
// data.
#include <cuda_runtime.h>

#include <string>

#include "../cuda/kernels.h"
#include "cuda_handler.h"
#include "validate.h"

namespace jax_moe {

static ffi::Error MoeMatmulCudaImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer ids,
                                    ffi::AnyBuffer w, ffi::AnyBuffer scores,
                                    ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> scratch,
                                    int32_t kind, int32_t wtype, int32_t layout, bool reduce) {
  MoeProblem p;
  if (ffi::Error err = describe_problem(x, ids, w, scores, *out, kind, wtype, layout, reduce, p);
      err.failure())
    return err;
  if (scratch->element_type() != ffi::DataType::U8 || scratch->dimensions().size() != 1)
    return invalid("the scratch result must be a 1-D uint8 buffer");
  if (ffi::Error err = check_disjoint(*scratch, "the scratch result", x, ids, w, scores); err.failure())
    return err;
  if (overlaps(*scratch, *out)) return invalid("the scratch result shares memory with out");
  const CudaDevice dev = current_device();
  if (p.kind != MoeKind::SCALAR_GGUF && p.x_dtype == DType::BF16 && dev.cc_major > 0 && dev.cc_major < 8)
    return invalid("bfloat16 tensor-core kinds need a GPU of compute capability 8.0 or newer");
  const MoeBuffers b = buffers_of(x, ids, w, scores, *out);
  const CudaStatus st = moe_forward_cuda(p, b, dev, static_cast<uint8_t*>(scratch->untyped_data()),
                                         scratch->size_bytes(), stream);
  switch (st.code) {
    case CudaStatus::Code::kInvalidArgument: return invalid(st.message);
    case CudaStatus::Code::kInternal: return ffi::Error::Internal("jax_moe.moe_matmul (cuda): " + st.message);
    case CudaStatus::Code::kOk: break;
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeMatmulCuda, MoeMatmulCudaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // expert_ids
                                  .Arg<ffi::AnyBuffer>()  // w
                                  .Arg<ffi::AnyBuffer>()  // scores
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Ret<ffi::AnyBuffer>()  // scratch (hidden by the wrapper)
                                  .Attr<int32_t>("kind")
                                  .Attr<int32_t>("wtype")
                                  .Attr<int32_t>("layout")
                                  .Attr<bool>("reduce"),
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace jax_moe
