// The CPU FFI handler of moe_matmul: validate, then run the CPU implementation.
#include "cpu_handler.h"

#include <exception>
#include <string>

#include "../cpu/fp_env.h"
#include "../cpu/moe_cpu.h"
#include "validate.h"

namespace jax_moe {

static ffi::Error MoeMatmulCpuImpl(ffi::AnyBuffer x, ffi::AnyBuffer ids, ffi::AnyBuffer w,
                                   ffi::AnyBuffer scores, ffi::Result<ffi::AnyBuffer> out,
                                   int32_t kind, int32_t wtype, int32_t layout, bool reduce) {
  MoeProblem p;
  if (ffi::Error err = describe_problem(x, ids, w, scores, *out, kind, wtype, layout, reduce, p);
      err.failure())
    return err;
  const MoeBuffers b = buffers_of(x, ids, w, scores, *out);
  try {
    const IeeeFloatScope ieee;  // XLA's threads flush subnormals; the contract's f32 does not
    moe_forward_cpu(p, b);
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("jax_moe.moe_matmul (cpu): ") + e.what());
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeMatmulCpu, MoeMatmulCpuImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // expert_ids
                                  .Arg<ffi::AnyBuffer>()  // w
                                  .Arg<ffi::AnyBuffer>()  // scores
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Attr<int32_t>("kind")
                                  .Attr<int32_t>("wtype")
                                  .Attr<int32_t>("layout")
                                  .Attr<bool>("reduce"));

}  // namespace jax_moe
