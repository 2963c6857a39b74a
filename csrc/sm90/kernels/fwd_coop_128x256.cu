// Instantiates one grouped-GEMM configuration (csrc/sm90/grouped_gemm.cuh): one TU each, so builds run in parallel.
#include "../grouped_gemm.cuh"

namespace engmoe_sm90 {
using Tile_kFwdCoop128x256 = cute::Shape<cute::_128, cute::_256, cute::_64>;
ENGMOE_SM90_DEFINE_CONFIG(kFwdCoop128x256, "cooperative_128x256x64", ENGMOE_SM90_FWD, Tile_kFwdCoop128x256, Cooperative)
}  // namespace engmoe_sm90
