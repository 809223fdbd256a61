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
  kMmaGemv,       // few pairs per expert, GGUF experts: rows decoded once per 8 or 16 pairs, mma.sync (mma_gemv.cuh)
  kWgmma,         // Hopper grouped GEMM on wgmma, dense experts
  kWgmmaGguf,     // Hopper grouped GEMM on wgmma, GGUF blocks decoded in shared memory
  kWmma,          // grouped WMMA GEMM (any tensor-core GPU, either layout, GGUF decoded in registers)
};

// GEMM tiles: BM pairs x BN weight rows. kNone for the GEMV.
enum class GemmTile : int32_t { kNone, kWide128x256, kNarrow64x256, kSlim64x128, kGguf64x128, kGguf128x128,
                                kGguf256x128, kWmma128x128, kWmmaSkinny32x256 };

struct CudaPlan {
  CudaKernel kernel = CudaKernel::kTokenGemv;
  GemmTile tile = GemmTile::kNone;
  int tile_m = 0;  // pairs per M tile (the grouping's tile height), 0 for the GEMV
  bool grouped() const { return kernel != CudaKernel::kTokenGemv && kernel != CudaKernel::kMmaGemv; }
};

// Where the tensor-core GEMV of GGUF experts (mma_gemv.cuh) runs: tensor cores with mma.sync
// (sm_80+), 16-byte-aligned x and w, [E, N, K] weights, K a multiple of its 256-element chunk (or,
// for MXFP4, whose tile reads rows on any 2-byte boundary, of 64: a lane's share of a chunk, as in
// gpt-oss's K = 2880), at most kMmaMaxPairs pairs and kMmaMaxE experts, formats whose blocks tile 256.
constexpr int kMmaChunk = 256;     // K per chunk (the K-quants' block); 64 per lane
constexpr int kMmaMaxPairs = 1024;  // pairs per call the kernel takes (Qwen3 T = 128: 8 per expert)
constexpr int kMmaMaxE = 4096;     // experts the kernel's shared bitmap covers
constexpr bool mma_gemv_k_fits(GGMLType t, int64_t K) {
  return K > 0 && (K % kMmaChunk == 0 || (t == GGMLType::MXFP4 && K % 64 == 0));
}
inline bool mma_gemv_fits(const MoeProblem& p, const CudaDevice& d, bool aligned16) {
  if (d.cc_major < 8 || !aligned16 || !mma_gemv_k_fits(p.wtype, p.K) || p.layout != WeightLayout::ENK) return false;
  if (p.pairs() > kMmaMaxPairs || p.E > kMmaMaxE || p.pairs() == 0) return false;
  return p.kind == MoeKind::WMMA_GGUF && is_quantized(p.wtype) && kMmaChunk % block_elems(p.wtype) == 0;
}

// Pairs per expert up to which a GEMV serves rather than the grouped GEMM. The tensor-core GEMV
// reads and decodes each routed expert's rows once per pass of 8 pairs, or of 16 where experts
// average more than 6 (mma_gemv.cuh), and serves up to kMmaGemvPairsPerExpert pairs per expert on
// average (with passes of 8, measured on Mixtral gate+up Q4_K: at 8 per expert 504 µs against ~610
// in the fused GEMM, at 10 a tie, at 12 695; with passes of 16, in one run, 472 µs at 8, 505 at 10,
// 668 at 12 and 775 at 16 against the fused GEMM's ~610: a tie near 11, benchmarks/NOTES.md, v28); the
// token GEMV (dense experts, and GGUF where the mma GEMV does not fit) re-reads an expert for
// every pair: up to 2 pairs per expert, 1 on Hopper, whose wgmma GEMM streams the weights fast.
// Formats whose GEMV tile runs passes of 16 pairs (mma_gemv.cuh: Tile::TWO_BLOCKS; Q3_K's, Q5_K's
// and Q6_K's would spill) cross over at the measured 11 pairs per expert, the others at 10.
constexpr bool mma_two_blocks(GGMLType t) {
  return t != GGMLType::Q3_K && t != GGMLType::Q5_K && t != GGMLType::Q6_K;
}
constexpr int64_t kMmaGemvPairsPerExpert = 11;
constexpr int64_t kMmaGemvPairsPerExpertOnePass = 10;
inline bool gemv_serves(const MoeProblem& p, const CudaDevice& d, bool aligned16) {
  if (p.kind == MoeKind::SCALAR_GGUF) return true;  // no tensor cores: always the token GEMV
  if (p.layout != WeightLayout::ENK) return false;  // the GEMVs need rows contiguous along K
  if (p.T <= 4) return true;
  if (mma_gemv_fits(p, d, aligned16))
    return p.pairs() <= (mma_two_blocks(p.wtype) ? kMmaGemvPairsPerExpert : kMmaGemvPairsPerExpertOnePass) * p.E;
  return p.pairs() <= (d.hopper() ? 1 : 2) * p.E;
}

// Shared-memory bytes of one weight row's raw GGUF stage in wgmma_gguf.cu: the bytes of 256 K
// elements, copied from the 16-byte boundary below them, in whole 16-byte pieces.
constexpr int gguf_raw_row_bytes(int block_bytes, int block_elems) {
  const int chunk = 256 / block_elems * block_bytes;
  const int align = block_bytes % 16 == 0 ? 16 : block_bytes % 8 == 0 ? 8 : block_bytes % 4 == 0 ? 4
                    : block_bytes % 2 == 0 ? 2 : 1;
  return (chunk + (16 - align) + 15) / 16 * 16;
}
// The 256 x 128 GGUF tile (two warpgroups of 128 pairs, x_stages x stages of 256 rows, 3 B tiles,
// at least 2 raw stages of 128 rows, the epilogue's pair table) in Hopper's 227 KiB of shared
// memory. With 4 x stages (copies two K steps ahead) it fits Q2_K, Q3_K, Q4_K, Q5_K and MXFP4; Q6_K
// and Q8_0 (whose 256 K elements take 210 and 272 bytes) fit with 3 (copies one step ahead), and
// run it so: their decode, not their x copies, bounds the 128-row tile (benchmarks/NOTES.md, v34).
constexpr int kHopperSmemBytes = 227 * 1024;
constexpr int gguf_tall_smem_bytes(int block_bytes, int block_elems, int x_stages) {
  return x_stages * 256 * 128 + 3 * 128 * 128 + 2 * 128 * gguf_raw_row_bytes(block_bytes, block_elems) + 1024 +
         256 * 12;
}
constexpr int gguf_tall_x_stages(GGMLType t) {
  return gguf_tall_smem_bytes(block_bytes(t), block_elems(t), 4) <= kHopperSmemBytes ? 4 : 3;
}
constexpr bool gguf_tall_fits(GGMLType t) {
  return is_quantized(t) && gguf_tall_smem_bytes(block_bytes(t), block_elems(t), 3) <= kHopperSmemBytes;
}

// Tile choices of the Hopper kernels.
constexpr int64_t kWidePairsPerExpert = 128;  // from here 128 x 256 (dense) / 128 x 128 (GGUF)
// GGUF from here: 256 x 128, each weight decoded once per 256 pairs instead of 128 (the decode,
// not the tensor cores, bounds the 128-row tile: benchmarks/NOTES.md, v20).
constexpr int64_t kTallPairsPerExpert = 256;
constexpr int64_t kSlimBlocks = 264;          // fewer 64 x 256 blocks than this: 64 x 128
constexpr int64_t kSkinnyPairsPerExpert = 64;  // WMMA: below this the 32 x 256 tile

inline int tile_rows(GemmTile t) {
  switch (t) {
    case GemmTile::kGguf256x128: return 256;
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
    case GemmTile::kGguf256x128: case GemmTile::kWmma128x128: return 128;
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
    const bool tall = p.pairs() >= kTallPairsPerExpert * (p.E > 1 ? p.E : 1) && gguf_tall_fits(p.wtype);
    plan.tile = tall ? GemmTile::kGguf256x128 : wide ? GemmTile::kGguf128x128 : GemmTile::kGguf64x128;
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
