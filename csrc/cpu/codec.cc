#include "codec.h"

#include <stdexcept>
#include <string>

#include "../common/gguf_formats.h"
#include "parallel.h"
#include "quantize.h"

namespace jax_moe {

namespace {

// Every size a codec is given is checked before any byte is touched, so that a caller outside
// the Python wrapper gets std::invalid_argument instead of a division by zero, a partial block
// or an overflowing byte count: a supported format, rows >= 0, k >= 0 a multiple of the block
// size, rows * k and the byte count representable, and buffers present whenever there is work.
void check_sizes(const char* fn, GGMLType t, int64_t rows, int64_t k, const void* src, const void* dst) {
  const std::string where = std::string("jax_moe::") + fn + ": ";
  if (!is_quantized(t))
    throw std::invalid_argument(where + "type " + std::to_string(static_cast<int>(t)) +
                                " is not one of Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, MXFP4");
  if (rows < 0 || k < 0)
    throw std::invalid_argument(where + "rows (" + std::to_string(rows) + ") and k (" + std::to_string(k) +
                                ") must be >= 0");
  if (k % block_elems(t) != 0)
    throw std::invalid_argument(where + "k = " + std::to_string(k) + " is not a multiple of the " +
                                type_name(t) + " block size " + std::to_string(block_elems(t)));
  constexpr int64_t kMax = int64_t{1} << 62;
  if (k != 0 && rows > kMax / k / 4)  // rows * k floats (4 bytes each) must be addressable
    throw std::invalid_argument(where + "rows * k = " + std::to_string(rows) + " * " + std::to_string(k) +
                                " is too large");
  if (rows != 0 && k != 0 && (src == nullptr || dst == nullptr))
    throw std::invalid_argument(where + "null buffer");
}

}  // namespace

void quantize_rows(GGMLType t, const float* src, int64_t rows, int64_t k, uint8_t* dst) {
  check_sizes("quantize_rows", t, rows, k, src, dst);
  const int64_t row_bytes = k / block_elems(t) * block_bytes(t);
  parallel_for(rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) quantize_row(t, src + r * k, k, dst + r * row_bytes);
  });
}

void dequantize_rows(GGMLType t, const uint8_t* src, int64_t rows, int64_t k, float* dst) {
  check_sizes("dequantize_rows", t, rows, k, src, dst);
  dispatch_format(t, [&](auto fmt) {
    using F = decltype(fmt);
    const int64_t nb = k / F::QK;
    const auto* blocks = reinterpret_cast<const typename F::Block*>(src);
    parallel_for(rows * nb, 1024, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) decode_block<F>(blocks[b], dst + b * F::QK);
    });
  });
}

}  // namespace jax_moe
