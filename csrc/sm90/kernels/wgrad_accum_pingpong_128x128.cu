// Instantiates one grouped-GEMM configuration (csrc/sm90/grouped_gemm.cuh): one TU each, so builds run in parallel.
#include "../grouped_gemm.cuh"

namespace engmoe_sm90 {
using Tile_kWgradAccumPingpong128x128 = cute::Shape<cute::_128, cute::_128, cute::_64>;
ENGMOE_SM90_DEFINE_CONFIG(kWgradAccumPingpong128x128, "pingpong_128x128x64", ENGMOE_SM90_WGRAD_ACCUM, Tile_kWgradAccumPingpong128x128, Pingpong)
}  // namespace engmoe_sm90
