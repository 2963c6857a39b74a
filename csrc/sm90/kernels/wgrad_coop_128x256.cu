// Instantiates one grouped-GEMM configuration (csrc/sm90/grouped_gemm.cuh): one TU each, so builds run in parallel.
// The unfused bf16 weight gradient (no main_grad to accumulate into) on the cooperative schedule, as the forward's
// tiles: ping-pong 128 x 128 ran 12-20 % behind torch._grouped_mm here. Tile N 256 is a multiple of 64, so the
// N-contiguous output gradient keeps its 128-byte swizzle. docs/kernels-sm90.md.
#include "../grouped_gemm.cuh"

namespace engmoe_sm90 {
using Tile_kWgradCoop128x256 = cute::Shape<cute::_128, cute::_256, cute::_64>;
ENGMOE_SM90_DEFINE_CONFIG(kWgradCoop128x256, "cooperative_128x256x64", ENGMOE_SM90_WGRAD, Tile_kWgradCoop128x256, Cooperative)
}  // namespace engmoe_sm90
