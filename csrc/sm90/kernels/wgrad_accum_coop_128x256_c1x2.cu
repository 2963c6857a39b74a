// Instantiates one grouped-GEMM configuration (csrc/sm90/grouped_gemm.cuh): one TU each, so builds run in parallel.
#include "../grouped_gemm.cuh"

namespace engmoe_sm90 {
using Tile_kWgradAccumCoop128x256C1x2 = cute::Shape<cute::_128, cute::_256, cute::_64>;
using Cluster_kWgradAccumCoop128x256C1x2 = cute::Shape<cute::_1, cute::_2, cute::_1>;
ENGMOE_SM90_DEFINE_CONFIG_CLUSTER(kWgradAccumCoop128x256C1x2, "cooperative_128x256x64_c1x2", ENGMOE_SM90_WGRAD_ACCUM, Tile_kWgradAccumCoop128x256C1x2, Cooperative, Cluster_kWgradAccumCoop128x256C1x2)
}  // namespace engmoe_sm90
