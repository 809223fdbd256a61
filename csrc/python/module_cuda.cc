// _jax_moe_cuda: the CUDA FFI handler and facts about the CUDA build, for Python.
#include <cuda_runtime_api.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <sstream>
#include <string>
#include <vector>

#include "../cuda/kernels.h"
#include "../cuda/plan.h"
#include "../cuda/scratch.h"
#include "../ffi/cuda_handler.h"

namespace nb = nanobind;
using namespace jax_moe;

#ifndef JAX_MOE_CUDA_ARCHS
#define JAX_MOE_CUDA_ARCHS ""
#endif

// The problem the plan sees (shapes, kind, format, layout; dtypes do not change the plan).
static MoeProblem problem_of(int kind, int wtype, int layout, int64_t T, int64_t k, int64_t E, int64_t N,
                             int64_t K, int64_t x_rows, bool reduce) {
  MoeProblem p;
  p.kind = static_cast<MoeKind>(kind);
  p.wtype = static_cast<GGMLType>(wtype);
  p.layout = static_cast<WeightLayout>(layout);
  p.T = T; p.k = k; p.E = E; p.N = N; p.K = K;
  p.x_per_pair = x_rows != T;
  p.reduce = reduce;
  return p;
}

NB_MODULE(_jax_moe_cuda, m) {
  m.doc() = "jax_moe CUDA implementation: FFI handler and build facts";
  m.def("registrations", []() {
    nb::dict d;
    d["jax_moe_matmul"] = nb::capsule(reinterpret_cast<void*>(&MoeMatmulCuda));
    return d;
  });
  // Bytes of scratch a call needs on any GPU, and the plan (kernel and tile) it runs on this one.
  m.def(
      "scratch_bytes",
      [](int kind, int wtype, int layout, int64_t T, int64_t k, int64_t E, int64_t N, int64_t K, int64_t x_rows,
         bool reduce) {
        return scratch_bytes_any_device(problem_of(kind, wtype, layout, T, k, E, N, K, x_rows, reduce));
      },
      nb::arg("kind"), nb::arg("wtype"), nb::arg("layout"), nb::arg("T"), nb::arg("k"), nb::arg("E"),
      nb::arg("N"), nb::arg("K"), nb::arg("x_rows"), nb::arg("reduce"));
  // device: "current" (the current GPU with this build), "hopper" (compute capability 9.0 with
  // sm_90a code) or "generic" (a tensor-core GPU without wgmma) -- the last two need no GPU.
  m.def(
      "plan_description",
      [](int kind, int wtype, int layout, int64_t T, int64_t k, int64_t E, int64_t N, int64_t K, int64_t x_rows,
         bool reduce, const std::string& device) {
        CudaDevice d;
        if (device == "current") {
          d = current_device();
        } else if (device == "hopper") {
          d.cc_major = 9;
          d.sm90a_build = true;
        } else if (device == "generic") {
          d.cc_major = 8;
        } else {
          throw nb::value_error(("device must be 'current', 'hopper' or 'generic', got '" + device + "'").c_str());
        }
        return describe(plan_call(problem_of(kind, wtype, layout, T, k, E, N, K, x_rows, reduce), d, true));
      },
      nb::arg("kind"), nb::arg("wtype"), nb::arg("layout"), nb::arg("T"), nb::arg("k"), nb::arg("E"),
      nb::arg("N"), nb::arg("K"), nb::arg("x_rows"), nb::arg("reduce"), nb::arg("device") = "current");
  m.def("architectures", []() {
    std::vector<int> archs;
    std::stringstream ss(JAX_MOE_CUDA_ARCHS);
    for (std::string item; std::getline(ss, item, ',');)
      if (!item.empty()) archs.push_back(std::stoi(item));
    return archs;
  });
  // Built with sm_90a code (Hopper's wgmma GEMM), used on compute capability 9.0 devices.
  m.def("has_sm90a", []() { return std::string(JAX_MOE_CUDA_ARCHS).find("90a") != std::string::npos; });
  m.def("runtime_version", []() {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  });
  m.def("kinds", []() { return std::vector<std::string>{"SCALAR_GGUF", "WMMA", "WMMA_GGUF"}; });
}
