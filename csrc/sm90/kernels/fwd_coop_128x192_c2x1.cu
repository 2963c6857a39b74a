// Instantiates one grouped-GEMM configuration (csrc/sm90/grouped_gemm.cuh): one TU each, so builds run in parallel.
// Tile N 192 divides the down-projection's 2880 output columns exactly (256 computes 3072) and is a multiple of 64,
// so the N-contiguous weight keeps the 128-byte swizzle. docs/kernels-sm90.md, "Tiles that fit".
#include "../grouped_gemm.cuh"

namespace engmoe_sm90 {
using Tile_kFwdCoop128x192C2x1 = cute::Shape<cute::_128, cute::_192, cute::_64>;
using Cluster_kFwdCoop128x192C2x1 = cute::Shape<cute::_2, cute::_1, cute::_1>;
ENGMOE_SM90_DEFINE_CONFIG_CLUSTER(kFwdCoop128x192C2x1, "cooperative_128x192x64_c2x1", ENGMOE_SM90_FWD, Tile_kFwdCoop128x192C2x1, Cooperative, Cluster_kFwdCoop128x192C2x1)
}  // namespace engmoe_sm90
