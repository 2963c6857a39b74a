// Instantiates one grouped-GEMM configuration (csrc/sm90/grouped_gemm.cuh): one TU each, so builds run in parallel.
#include "../grouped_gemm.cuh"

namespace engmoe_sm90 {
using Tile_kFwdCoop128x256C2x1 = cute::Shape<cute::_128, cute::_256, cute::_64>;
using Cluster_kFwdCoop128x256C2x1 = cute::Shape<cute::_2, cute::_1, cute::_1>;
ENGMOE_SM90_DEFINE_CONFIG_CLUSTER(kFwdCoop128x256C2x1, "cooperative_128x256x64_c2x1", ENGMOE_SM90_FWD, Tile_kFwdCoop128x256C2x1, Cooperative, Cluster_kFwdCoop128x256C2x1)
}  // namespace engmoe_sm90
