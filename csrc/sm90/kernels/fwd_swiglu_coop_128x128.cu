// The SwiGLU up-projection (../swiglu_epilogue.cuh) on 128x128 tiles: fewer accumulator registers per thread
// for the register-to-global epilogue, and 2160 padded by 16 columns like 256x128.
#include "../grouped_gemm.cuh"

namespace engmoe_sm90 {
using Tile_kFwdSwigluCoop128x128 = cute::Shape<cute::_128, cute::_128, cute::_64>;
ENGMOE_SM90_DEFINE_CONFIG(kFwdSwigluCoop128x128, "cooperative_128x128x64", ENGMOE_SM90_FWD_SWIGLU,
                          Tile_kFwdSwigluCoop128x128, Cooperative)
}  // namespace engmoe_sm90
