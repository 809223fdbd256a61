// _jax_moe_cpu: the CPU FFI handler, the host GGUF codecs and build facts, for Python.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "../common/gguf_blocks.h"
#include "../cpu/codec.h"
#include "../ffi/cpu_handler.h"
#include "xla/ffi/api/c_api.h"

namespace nb = nanobind;
using namespace jax_moe;

namespace {

GGMLType checked_type(int qtype) {
  const auto t = static_cast<GGMLType>(qtype);
  if (!is_quantized(t))
    throw std::invalid_argument("qtype must be one of Q8_0 (8), Q2_K (10), Q3_K (11), Q4_K (12), "
                                "Q5_K (13), Q6_K (14), MXFP4 (39); got " + std::to_string(qtype));
  return t;
}

template <class T>
nb::ndarray<nb::numpy, T> new_array(const std::vector<size_t>& shape) {
  size_t n = 1;
  for (size_t d : shape) n *= d;
  T* data = new T[n > 0 ? n : 1];
  nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<T*>(p); });
  return nb::ndarray<nb::numpy, T>(data, shape.size(), shape.data(), owner);
}

// quantize(x: float32 [..., K] C-contiguous, qtype) -> uint8 [..., K / QK * block_bytes]
nb::ndarray<nb::numpy, uint8_t> quantize(nb::ndarray<const float, nb::c_contig, nb::device::cpu> x,
                                         int qtype) {
  const GGMLType t = checked_type(qtype);
  if (x.ndim() < 1) throw std::invalid_argument("x must have at least one dimension");
  const int64_t k = static_cast<int64_t>(x.shape(x.ndim() - 1));
  if (k % block_elems(t) != 0)
    throw std::invalid_argument("the last dimension of x (" + std::to_string(k) +
                                ") must be a multiple of " + std::to_string(block_elems(t)) +
                                " for " + type_name(t));
  std::vector<size_t> shape(x.shape_ptr(), x.shape_ptr() + x.ndim());
  const int64_t rows = k == 0 ? 0 : static_cast<int64_t>(x.size()) / k;
  shape.back() = static_cast<size_t>(k / block_elems(t) * block_bytes(t));
  auto out = new_array<uint8_t>(shape);
  {
    nb::gil_scoped_release release;
    quantize_rows(t, x.data(), rows, k, out.data());
  }
  return out;
}

// dequantize(data: uint8 [..., B] C-contiguous, qtype) -> float32 [..., B / block_bytes * QK]
nb::ndarray<nb::numpy, float> dequantize(nb::ndarray<const uint8_t, nb::c_contig, nb::device::cpu> d,
                                         int qtype) {
  const GGMLType t = checked_type(qtype);
  if (d.ndim() < 1) throw std::invalid_argument("data must have at least one dimension");
  const int64_t nbytes = static_cast<int64_t>(d.shape(d.ndim() - 1));
  if (nbytes % block_bytes(t) != 0)
    throw std::invalid_argument("the last dimension of data (" + std::to_string(nbytes) +
                                " bytes) must be a multiple of " + std::to_string(block_bytes(t)) +
                                " (one " + type_name(t) + " block)");
  const int64_t k = nbytes / block_bytes(t) * block_elems(t);
  const int64_t rows = nbytes == 0 ? 0 : static_cast<int64_t>(d.size()) / nbytes;
  std::vector<size_t> shape(d.shape_ptr(), d.shape_ptr() + d.ndim());
  shape.back() = static_cast<size_t>(k);
  auto out = new_array<float>(shape);
  {
    nb::gil_scoped_release release;
    dequantize_rows(t, d.data(), rows, k, out.data());
  }
  return out;
}

}  // namespace

NB_MODULE(_jax_moe_cpu, m) {
  m.doc() = "jax_moe CPU implementation: FFI handler and GGUF codecs";
  m.def("registrations", []() {
    nb::dict d;
    d["jax_moe_matmul"] = nb::capsule(reinterpret_cast<void*>(&MoeMatmulCpu));
    return d;
  });
  m.def("quantize", &quantize, nb::arg("x"), nb::arg("qtype"));
  // The block bytes are taken as given: no implicit conversion (a uint16 or float array would be
  // converted value by value to uint8, decoding bytes that are not the caller's blocks).
  m.def("dequantize", &dequantize, nb::arg("data").noconvert(), nb::arg("qtype"));
  m.def("block_elems", [](int t) { return block_elems(checked_type(t)); });
  m.def("block_bytes", [](int t) { return block_bytes(checked_type(t)); });
  m.def("ffi_api_version", []() { return nb::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR); });
}
