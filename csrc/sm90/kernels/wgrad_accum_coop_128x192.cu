// Instantiates one grouped-GEMM configuration (csrc/sm90/grouped_gemm.cuh): one TU each, so builds run in parallel.
// Tile N 192 divides the w2 gradient's 2880 columns exactly and keeps the 128-byte swizzle of the N-contiguous
// output gradient: the fp32 read + write of main_grad covers no padded columns. docs/kernels-sm90.md, "Tiles that fit".
#include "../grouped_gemm.cuh"

namespace engmoe_sm90 {
using Tile_kWgradAccumCoop128x192 = cute::Shape<cute::_128, cute::_192, cute::_64>;
ENGMOE_SM90_DEFINE_CONFIG(kWgradAccumCoop128x192, "cooperative_128x192x64", ENGMOE_SM90_WGRAD_ACCUM, Tile_kWgradAccumCoop128x192, Cooperative)
}  // namespace engmoe_sm90
