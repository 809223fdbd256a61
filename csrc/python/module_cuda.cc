// _jax_moe_cuda: the CUDA FFI handler and facts about the CUDA build, for Python.
#include <cuda_runtime_api.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <sstream>
#include <string>
#include <vector>

#include "../cuda/scratch.h"
#include "../ffi/cuda_handler.h"

namespace nb = nanobind;
using namespace jax_moe;

#ifndef JAX_MOE_CUDA_ARCHS
#define JAX_MOE_CUDA_ARCHS ""
#endif

NB_MODULE(_jax_moe_cuda, m) {
  m.doc() = "jax_moe CUDA implementation: FFI handler and build facts";
  m.def("registrations", []() {
    nb::dict d;
    d["jax_moe_matmul"] = nb::capsule(reinterpret_cast<void*>(&MoeMatmulCuda));
    return d;
  });
  m.def(
      "scratch_bytes",
      [](int kind, int64_t T, int64_t k, int64_t E, int64_t N, int64_t K, int64_t x_rows, bool reduce) {
        return scratch_layout(static_cast<MoeKind>(kind), T, k, E, N, K, x_rows, reduce).total;
      },
      nb::arg("kind"), nb::arg("T"), nb::arg("k"), nb::arg("E"), nb::arg("N"), nb::arg("K"),
      nb::arg("x_rows"), nb::arg("reduce"));
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
