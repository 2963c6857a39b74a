// Instantiates one grouped-GEMM configuration (csrc/sm90/grouped_gemm.cuh): one TU each, so builds run in parallel.
// A 256-row tile with N 128: the forward's weight is N-contiguous, and a 128B-swizzled N-major tile needs N to be a
// multiple of 64, which 2160 is not; 128 pads 2160 by 16 columns (256 by 144). docs/kernels-sm90.md, "Tiles that fit".
#include "../grouped_gemm.cuh"

namespace engmoe_sm90 {
using Tile_kFwdCoop256x128 = cute::Shape<cute::_256, cute::_128, cute::_64>;
ENGMOE_SM90_DEFINE_CONFIG(kFwdCoop256x128, "cooperative_256x128x64", ENGMOE_SM90_FWD, Tile_kFwdCoop256x128, Cooperative)
}  // namespace engmoe_sm90
