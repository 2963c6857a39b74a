// Instantiates one grouped-GEMM configuration (csrc/sm90/grouped_gemm.cuh): one TU each, so builds run in parallel.
// Tile N 240 divides the up-projection dgrad's 2880 output columns exactly (256 computes 3072); a 2x1 cluster
// multicasts the weight tile. docs/kernels-sm90.md, "Tiles that fit".
// CUTLASS selects wgmma N shapes other than 256/192/128/96/64/32/16/8 only with this defined; without it these
// tiles ran as narrow instructions at half speed (measured, docs/kernels-sm90.md).
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#include "../grouped_gemm.cuh"

namespace engmoe_sm90 {
using Tile_kDgradCoop128x240C2x1 = cute::Shape<cute::_128, cute::_240, cute::_64>;
using Cluster_kDgradCoop128x240C2x1 = cute::Shape<cute::_2, cute::_1, cute::_1>;
ENGMOE_SM90_DEFINE_CONFIG_CLUSTER(kDgradCoop128x240C2x1, "cooperative_128x240x64_c2x1", ENGMOE_SM90_DGRAD, Tile_kDgradCoop128x240C2x1, Cooperative, Cluster_kDgradCoop128x240C2x1)
}  // namespace engmoe_sm90
