// The one place that decides which CUDA kernel and tile a call runs (docs/contract.md §5). The launch
// (forward.cu), the scratch sizing (scratch.h, asked by the Python lowering) and the tests (through
// _jax_moe_cuda.plan_description) all ask plan_call. Host-only, plain C++.
#pragma once

#include <cstdint>
#include <string>

#include "../common/gguf_blocks.h"
#include "../common/moe_problem.h"

namespace jax_moe {

// What the device and the build allow.
struct CudaDevice {
  int cc_major = 0, cc_minor = 0;
  bool sm90a_build = false;  // the module carries sm_90a code (wgmma)
  // Hopper's wgmma kernels run: compute capability 9.0 and an sm_90a build.
  bool hopper() const { return sm90a_build && cc_major == 9 && cc_minor == 0; }
};

enum class CudaKernel : int32_t {
  kTokenGemv,     // few pairs per expert: a warp per (token, row), all three kinds
  kWgmma,         // Hopper grouped GEMM on wgmma, dense experts
  kWgmmaGguf,     // Hopper grouped GEMM on wgmma, GGUF blocks decoded in shared memory
  kWmma,          // grouped WMMA GEMM (any tensor-core GPU, either layout, GGUF decoded in registers)
};

// GEMM tiles: BM pairs x BN weight rows. kNone for the GEMV.
enum class GemmTile : int32_t { kNone, kWide128x256, kNarrow64x256, kSlim64x128, kGguf64x128, kGguf128x128,
                                kWmma128x128, kWmmaSkinny32x256 };

struct CudaPlan {
  CudaKernel kernel = CudaKernel::kTokenGemv;
  GemmTile tile = GemmTile::kNone;
  int tile_m = 0;  // pairs per M tile (the grouping's tile height), 0 for the GEMV
  bool grouped() const { return kernel != CudaKernel::kTokenGemv; }
};

// Pairs per expert up to which the GEMV serves (its re-reads of the weights cost less than
// the GEMM's tiles there). GGUF experts where the tensor-core GEMV fits (mma_gemv.cuh: K a
// multiple of 256, at most 512 pairs; small_t.cu picks it) have each expert's rows read and
// decoded once per 8 of its pairs, and it serves up to kMmaGemvPairsPerExpert pairs per expert
// on average (one mma pass; benchmarks/NOTES.md); elsewhere (dense experts too) the token GEMV
// re-reads an expert for every pair.
constexpr int64_t kMmaGemvPairsPerExpert = 8;
inline bool token_gemv_serves(const MoeProblem& p, const CudaDevice& d) {
  if (p.kind == MoeKind::SCALAR_GGUF) return true;  // no tensor cores: always the GEMV
  if (p.layout != WeightLayout::ENK) return false;  // the GEMV needs rows contiguous along K
  if (p.T <= 4) return true;
  const bool mma = p.kind == MoeKind::WMMA_GGUF && d.cc_major >= 8 && p.K % 256 == 0 && p.pairs() <= 512 &&
                   is_quantized(p.wtype) && 256 % block_elems(p.wtype) == 0;
  if (!mma) return p.pairs() <= (d.hopper() ? 1 : 2) * p.E;
  return p.pairs() <= kMmaGemvPairsPerExpert * p.E;
}

// Tile choices of the Hopper kernels.
constexpr int64_t kWidePairsPerExpert = 128;  // from here 128 x 256 (dense) / 128 x 128 (GGUF)
constexpr int64_t kSlimBlocks = 264;          // fewer 64 x 256 blocks than this: 64 x 128
constexpr int64_t kSkinnyPairsPerExpert = 64;  // WMMA: below this the 32 x 256 tile

inline int tile_rows(GemmTile t) {
  switch (t) {
    case GemmTile::kWide128x256: case GemmTile::kGguf128x128: case GemmTile::kWmma128x128: return 128;
    case GemmTile::kNarrow64x256: case GemmTile::kSlim64x128: case GemmTile::kGguf64x128: return 64;
    case GemmTile::kWmmaSkinny32x256: return 32;
    default: return 0;
  }
}

inline int tile_cols(GemmTile t) {
  switch (t) {
    case GemmTile::kWide128x256: case GemmTile::kNarrow64x256: case GemmTile::kWmmaSkinny32x256: return 256;
    case GemmTile::kSlim64x128: case GemmTile::kGguf64x128: case GemmTile::kGguf128x128:
    case GemmTile::kWmma128x128: return 128;
    default: return 0;
  }
}

// Upper bound on the M tiles of tile height bm over all experts: every non-empty expert adds at
// most one partial tile.
inline int64_t max_m_tiles(const MoeProblem& p, int bm) {
  const int64_t pairs = p.pairs();
  return (pairs + bm - 1) / bm + (p.E < pairs ? p.E : pairs);
}

// aligned16: x (and dense w, and GGUF w) start at 16-byte boundaries, so the kernels' 16-byte
// pieces are aligned (always so for XLA's buffers; checked by the launch).
inline CudaPlan plan_call(const MoeProblem& p, const CudaDevice& d, bool aligned16) {
  CudaPlan plan;
  if (token_gemv_serves(p, d)) return plan;
  const bool wide = p.pairs() >= kWidePairsPerExpert * (p.E > 1 ? p.E : 1);
  const bool hopper = d.hopper() && aligned16 && p.K % 8 == 0 && p.layout == WeightLayout::ENK;
  if (hopper && p.kind == MoeKind::WMMA_GGUF) {
    plan.kernel = CudaKernel::kWgmmaGguf;
    plan.tile = wide ? GemmTile::kGguf128x128 : GemmTile::kGguf64x128;
  } else if (hopper) {
    plan.kernel = CudaKernel::kWgmma;
    const bool slim = !wide && max_m_tiles(p, 64) * ((p.N + 255) / 256) < kSlimBlocks;
    plan.tile = wide ? GemmTile::kWide128x256 : slim ? GemmTile::kSlim64x128 : GemmTile::kNarrow64x256;
  } else {
    plan.kernel = CudaKernel::kWmma;
    plan.tile = p.pairs() < kSkinnyPairsPerExpert * (p.E > 1 ? p.E : 1) ? GemmTile::kWmmaSkinny32x256
                                                                         : GemmTile::kWmma128x128;
  }
  plan.tile_m = tile_rows(plan.tile);
  return plan;
}

inline std::string describe(const CudaPlan& plan) {
  const char* kernel = plan.kernel == CudaKernel::kTokenGemv  ? "token_gemv"
                       : plan.kernel == CudaKernel::kWgmma    ? "grouped_wgmma"
                       : plan.kernel == CudaKernel::kWgmmaGguf ? "grouped_wgmma_gguf"
                                                               : "grouped_wmma";
  std::string s = kernel;
  if (plan.grouped()) s += " " + std::to_string(tile_rows(plan.tile)) + "x" + std::to_string(tile_cols(plan.tile));
  return s;
}

}  // namespace jax_moe
