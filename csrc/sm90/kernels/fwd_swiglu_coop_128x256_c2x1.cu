// The SwiGLU up-projection (../swiglu_epilogue.cuh) on the fwd kind's default tile: 128x256 with a 2-CTA
// cluster multicasting the weight tile.
#include "../grouped_gemm.cuh"

namespace engmoe_sm90 {
using Tile_kFwdSwigluCoop128x256C2x1 = cute::Shape<cute::_128, cute::_256, cute::_64>;
using Cluster_kFwdSwigluCoop128x256C2x1 = cute::Shape<cute::_2, cute::_1, cute::_1>;
ENGMOE_SM90_DEFINE_CONFIG_CLUSTER(kFwdSwigluCoop128x256C2x1, "cooperative_128x256x64_c2x1", ENGMOE_SM90_FWD_SWIGLU,
                                  Tile_kFwdSwigluCoop128x256C2x1, Cooperative, Cluster_kFwdSwigluCoop128x256C2x1)
}  // namespace engmoe_sm90
