// Instantiates one grouped-GEMM configuration (csrc/sm90/grouped_gemm.cuh): one TU each, so builds run in parallel.
// Tile N 192: fits 2880 output columns with the 128-byte swizzle kept (fwd_coop_128x192_c2x1.cu), without a cluster.
#include "../grouped_gemm.cuh"

namespace engmoe_sm90 {
using Tile_kFwdCoop128x192 = cute::Shape<cute::_128, cute::_192, cute::_64>;
ENGMOE_SM90_DEFINE_CONFIG(kFwdCoop128x192, "cooperative_128x192x64", ENGMOE_SM90_FWD, Tile_kFwdCoop128x192, Cooperative)
}  // namespace engmoe_sm90
