// The up-projection with SwiGLU and the routing probability in the epilogue (../swiglu_epilogue.cuh): the fwd
// kind's best 2160-wide tile (256x128 pads 2160 by 16 columns), its B the gate/up-interleaved w13.
#include "../grouped_gemm.cuh"

namespace engmoe_sm90 {
using Tile_kFwdSwigluCoop256x128 = cute::Shape<cute::_256, cute::_128, cute::_64>;
ENGMOE_SM90_DEFINE_CONFIG(kFwdSwigluCoop256x128, "cooperative_256x128x64", ENGMOE_SM90_FWD_SWIGLU,
                          Tile_kFwdSwigluCoop256x128, Cooperative)
}  // namespace engmoe_sm90
