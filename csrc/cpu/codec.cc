#include "codec.h"

#include "../common/gguf_formats.h"
#include "parallel.h"
#include "quantize.h"

namespace jax_moe {

void quantize_rows(GGMLType t, const float* src, int64_t rows, int64_t k, uint8_t* dst) {
  const int64_t row_bytes = k / block_elems(t) * block_bytes(t);
  parallel_for(rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) quantize_row(t, src + r * k, k, dst + r * row_bytes);
  });
}

void dequantize_rows(GGMLType t, const uint8_t* src, int64_t rows, int64_t k, float* dst) {
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
