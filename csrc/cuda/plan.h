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
  kMmaGemv,       // few pairs per expert, GGUF experts: rows decoded once per 8 pairs, mma.sync (mma_gemv.cuh)
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
  bool grouped() const { return kernel != CudaKernel::kTokenGemv && kernel != CudaKernel::kMmaGemv; }
};

// Where the tensor-core GEMV of GGUF experts (mma_gemv.cuh) runs: tensor cores with mma.sync
// (sm_80+), 16-byte-aligned x and w, [E, N, K] weights, K a multiple of its 256-element granule,
// at most kMmaMaxPairs pairs and kMmaMaxE experts, formats whose blocks tile 256.
constexpr int kMmaChunk = 256;     // K granule: K % 256 == 0 (the K-quants' block)
constexpr int kMmaMaxPairs = 512;  // pairs per call the kernel takes
constexpr int kMmaMaxE = 4096;     // experts the kernel's shared bitmap covers
inline bool mma_gemv_fits(const MoeProblem& p, const CudaDevice& d, bool aligned16) {
  if (d.cc_major < 8 || !aligned16 || p.K % kMmaChunk != 0 || p.layout != WeightLayout::ENK) return false;
  if (p.pairs() > kMmaMaxPairs || p.E > kMmaMaxE || p.pairs() == 0) return false;
  return p.kind == MoeKind::WMMA_GGUF && is_quantized(p.wtype) && kMmaChunk % block_elems(p.wtype) == 0;
}

// Pairs per expert up to which a GEMV serves rather than the grouped GEMM. The tensor-core GEMV
// reads and decodes each routed expert's rows once per 8 of its pairs, and serves up to
// kMmaGemvPairsPerExpert pairs per expert on average (one mma pass; benchmarks/NOTES.md); the
// token GEMV (dense experts, and GGUF where the mma GEMV does not fit) re-reads an expert for
// every pair: up to 2 pairs per expert, 1 on Hopper, whose wgmma GEMM streams the weights fast.
constexpr int64_t kMmaGemvPairsPerExpert = 8;
inline bool gemv_serves(const MoeProblem& p, const CudaDevice& d, bool aligned16) {
  if (p.kind == MoeKind::SCALAR_GGUF) return true;  // no tensor cores: always the token GEMV
  if (p.layout != WeightLayout::ENK) return false;  // the GEMVs need rows contiguous along K
  if (p.T <= 4) return true;
  if (mma_gemv_fits(p, d, aligned16)) return p.pairs() <= kMmaGemvPairsPerExpert * p.E;
  return p.pairs() <= (d.hopper() ? 1 : 2) * p.E;
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
  if (gemv_serves(p, d, aligned16)) {
    plan.kernel = mma_gemv_fits(p, d, aligned16) ? CudaKernel::kMmaGemv : CudaKernel::kTokenGemv;
    return plan;
  }
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
                       : plan.kernel == CudaKernel::kMmaGemv  ? "mma_gemv"
                       : plan.kernel == CudaKernel::kWgmma    ? "grouped_wgmma"
                       : plan.kernel == CudaKernel::kWgmmaGguf ? "grouped_wgmma_gguf"
                                                               : "grouped_wmma";
  std::string s = kernel;
  if (plan.grouped()) s += " " + std::to_string(tile_rows(plan.tile)) + "x" + std::to_string(tile_cols(plan.tile));
  return s;
}

}  // namespace jax_moe
