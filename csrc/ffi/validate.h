// Argument checks shared by the CPU and CUDA FFI handlers: every shape, dtype and size that a
// kernel relies on is checked here, so a call from outside the Python wrapper cannot make a
// kernel read or write outside its buffers.
#pragma once

#include <climits>
#include <cstdint>
#include <string>
#include <utility>

#include "../common/gguf_blocks.h"
#include "../common/moe_problem.h"
#include "xla/ffi/api/ffi.h"

namespace jax_moe {

namespace ffi = xla::ffi;

inline std::string dims_str(ffi::Span<const int64_t> d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

inline const char* dtype_name(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::F16: return "float16";
    case ffi::DataType::BF16: return "bfloat16";
    case ffi::DataType::S32: return "int32";
    case ffi::DataType::U8: return "uint8";
    default: return "an unsupported dtype";
  }
}

inline bool to_dtype(ffi::DataType t, DType& out) {
  switch (t) {
    case ffi::DataType::F32: out = DType::F32; return true;
    case ffi::DataType::F16: out = DType::F16; return true;
    case ffi::DataType::BF16: out = DType::BF16; return true;
    default: return false;
  }
}

inline ffi::Error invalid(const std::string& msg) {
  return ffi::Error::InvalidArgument("jax_moe.moe_matmul: " + msg);
}

// Whether two buffers share a byte: address ranges only (host or device pointers alike), no
// read of their contents. Empty buffers share nothing.
inline bool overlaps(const ffi::AnyBuffer& a, const ffi::AnyBuffer& b) {
  const size_t na = a.size_bytes(), nb = b.size_bytes();
  if (na == 0 || nb == 0) return false;
  const auto pa = reinterpret_cast<uintptr_t>(a.untyped_data());
  const auto pb = reinterpret_cast<uintptr_t>(b.untyped_data());
  return pa < pb + nb && pb < pa + na;
}

// A result the call writes must not share memory with an input it reads (XLA never makes them
// share one unless asked to, with input_output_aliases on a direct custom call): the kernels
// read inputs after they have written parts of the result.
inline ffi::Error check_disjoint(const ffi::AnyBuffer& result, const char* result_name,
                                 const ffi::AnyBuffer& x, const ffi::AnyBuffer& ids,
                                 const ffi::AnyBuffer& w, const ffi::AnyBuffer& scores) {
  const std::pair<const ffi::AnyBuffer*, const char*> inputs[] = {
      {&x, "x"}, {&ids, "expert_ids"}, {&w, "w"}, {&scores, "scores"}};
  for (const auto& [in, name] : inputs)
    if (overlaps(result, *in))
      return invalid(std::string(result_name) + " shares memory with the input " + name +
                     " (an input_output_aliases entry?): the call would overwrite " + name +
                     " while it still reads it; give " + result_name + " a buffer of its own");
  return ffi::Error::Success();
}

// Fill `p` from the buffers and attributes, or say which argument is wrong.
inline ffi::Error describe_problem(const ffi::AnyBuffer& x, const ffi::AnyBuffer& ids,
                                   const ffi::AnyBuffer& w, const ffi::AnyBuffer& scores,
                                   const ffi::AnyBuffer& out, int32_t kind, int32_t wtype,
                                   int32_t layout, bool reduce, MoeProblem& p) {
  if (kind < 0 || kind > 2) return invalid("kind must be 0, 1 or 2, got " + std::to_string(kind));
  p.kind = static_cast<MoeKind>(kind);
  if (layout != 0 && layout != 1)
    return invalid("layout must be 0 (ENK) or 1 (EKN), got " + std::to_string(layout));
  p.layout = static_cast<WeightLayout>(layout);
  p.reduce = reduce;
  p.wtype = static_cast<GGMLType>(wtype);
  const bool gguf = p.kind != MoeKind::WMMA;

  const auto id = ids.dimensions();
  if (id.size() != 2 || ids.element_type() != ffi::DataType::S32)
    return invalid("expert_ids must be int32 [T, k], got " +
                   std::string(dtype_name(ids.element_type())) + " " + dims_str(id));
  p.T = id[0];
  p.k = id[1];
  if (p.T < 0 || p.k < 1) return invalid("expert_ids must have k >= 1, got " + dims_str(id));
  if (p.T > INT32_MAX / p.k)  // the CUDA grouping indexes pairs with int32
    return invalid("T * k = " + std::to_string(p.T) + " * " + std::to_string(p.k) +
                   " pairs exceeds the limit of 2^31 - 1 pairs per call; split the tokens");

  const auto xd = x.dimensions();
  if (xd.size() == 2 && xd[0] == p.T) {
    p.x_per_pair = false;
  } else if (xd.size() == 3 && xd[0] == p.T && xd[1] == p.k) {
    p.x_per_pair = true;
  } else {
    return invalid("x must be [T, K] or [T, k, K] with [T, k] = " + dims_str(id) + ", got " +
                   dims_str(xd));
  }
  p.K = xd[xd.size() - 1];
  if (!to_dtype(x.element_type(), p.x_dtype))
    return invalid(std::string("x must be float32, float16 or bfloat16, got ") +
                   dtype_name(x.element_type()));
  if (p.kind == MoeKind::SCALAR_GGUF && p.x_dtype != DType::F32)
    return invalid("SCALAR_GGUF takes float32 x, got " + std::string(dtype_name(x.element_type())));
  if (p.kind != MoeKind::SCALAR_GGUF && p.x_dtype == DType::F32)
    return invalid("WMMA and WMMA_GGUF take float16 or bfloat16 x, got float32");

  const auto wd = w.dimensions();
  if (wd.size() != 3) return invalid("w must be rank 3, got " + dims_str(wd));
  p.E = wd[0];
  if (gguf) {
    if (!is_quantized(p.wtype))
      return invalid("qtype " + std::to_string(wtype) + " is not a supported GGUF format");
    if (w.element_type() != ffi::DataType::U8)
      return invalid("quantized w must be uint8 blocks, got " +
                     std::string(dtype_name(w.element_type())));
    if (p.layout != WeightLayout::ENK) return invalid("quantized w must use the ENK layout");
    const int qk = block_elems(p.wtype);
    if (p.K % qk != 0)
      return invalid("K = " + std::to_string(p.K) + " must be a multiple of " +
                     std::to_string(qk) + " for " + type_name(p.wtype));
    p.N = wd[1];
    if (wd[2] != p.row_bytes())
      return invalid("quantized w must be [E, N, " + std::to_string(p.row_bytes()) + "] for K = " +
                     std::to_string(p.K) + " in " + type_name(p.wtype) + ", got " + dims_str(wd));
  } else {
    DType wt;
    if (!to_dtype(w.element_type(), wt) || wt != p.x_dtype)
      return invalid("dense w must have x's dtype " + std::string(dtype_name(x.element_type())) +
                     ", got " + dtype_name(w.element_type()));
    p.wtype = wt == DType::F16 ? GGMLType::F16 : GGMLType::BF16;
    const int64_t wk = p.layout == WeightLayout::ENK ? wd[2] : wd[1];
    p.N = p.layout == WeightLayout::ENK ? wd[1] : wd[2];
    if (wk != p.K)
      return invalid("w " + dims_str(wd) + " does not match K = " + std::to_string(p.K) + " (" +
                     (p.layout == WeightLayout::ENK ? "[E, N, K]" : "[E, K, N]") + " expected)");
  }

  const auto sd = scores.dimensions();
  if (sd.size() != 2 || sd[0] != p.T || sd[1] != p.k)
    return invalid("scores must be [T, k] = " + dims_str(id) + ", got " + dims_str(sd));
  if (!to_dtype(scores.element_type(), p.score_dtype) ||
      (p.score_dtype != DType::F32 && p.score_dtype != p.x_dtype))
    return invalid("scores must be float32 or x's dtype, got " +
                   std::string(dtype_name(scores.element_type())));

  const auto od = out.dimensions();
  const bool out_ok = p.reduce ? (od.size() == 2 && od[0] == p.T && od[1] == p.N)
                               : (od.size() == 3 && od[0] == p.T && od[1] == p.k && od[2] == p.N);
  if (!out_ok)
    return invalid(std::string("out must be ") + (p.reduce ? "[T, N]" : "[T, k, N]") + " with T=" +
                   std::to_string(p.T) + " k=" + std::to_string(p.k) + " N=" +
                   std::to_string(p.N) + ", got " + dims_str(od));
  if (!to_dtype(out.element_type(), p.out_dtype))
    return invalid("out must be float32, float16 or bfloat16");
  if (p.kind == MoeKind::SCALAR_GGUF && p.out_dtype != DType::F32)
    return invalid("SCALAR_GGUF writes float32 out");
  return check_disjoint(out, "out", x, ids, w, scores);
}

// The raw pointers of one validated call.
inline MoeBuffers buffers_of(const ffi::AnyBuffer& x, const ffi::AnyBuffer& ids, const ffi::AnyBuffer& w,
                             const ffi::AnyBuffer& scores, ffi::AnyBuffer& out) {
  MoeBuffers b;
  b.x = x.untyped_data();
  b.ids = static_cast<const int32_t*>(ids.untyped_data());
  b.w = w.untyped_data();
  b.scores = scores.untyped_data();
  b.out = out.untyped_data();
  return b;
}

}  // namespace jax_moe
