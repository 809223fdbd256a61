// The order in which the grouped GEMMs (wgmma.cu, wgmma_gguf.cu) visit their (M tile, N tile)
// blocks. Blocks launch in blockIdx order, x fastest; with x = M tile and y = N tile, the blocks
// in flight at once span every M tile of one or two N tiles, so each N tile re-reads all of x's
// gathered rows (235 MB for Mixtral's down projection at T = 4096, past the 50 MB L2). Grouped
// rasterization (as CUTLASS's and Triton's grouped-M swizzle) walks `group` M tiles (about one
// expert's) across every N tile before the next group: an expert's x rows stay in L2 while its
// weight tiles stream once, each read by the group's M tiles at about the same time.
// Plain C++ with host/device qualifiers: tests/cpp checks it is a bijection.
#pragma once

#include <cstdint>

#include "../common/hd.h"

namespace jax_moe {

constexpr int64_t kRasterGroup = 8;  // M tiles per group: one Mixtral expert's at T = 4096 (128 rows)

struct TileCoord {
  int64_t m, n;
};

// Block `linear` (0 <= linear < mt * nt, in launch order) of an mt x nt grid of tiles.
JM_HD TileCoord raster_tile(int64_t linear, int64_t mt, int64_t nt, int64_t group) {
  const int64_t per_group = group * nt;
  const int64_t g = linear / per_group, idx = linear % per_group, first = g * group;
  const int64_t gm = mt - first < group ? mt - first : group;  // the last group may be short
  return TileCoord{first + idx % gm, idx / gm};
}

}  // namespace jax_moe
