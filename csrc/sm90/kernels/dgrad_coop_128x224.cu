// Instantiates one grouped-GEMM configuration (csrc/sm90/grouped_gemm.cuh): one TU each, so builds run in parallel.
// Tile N 224 for the down-projection's dgrad (1080 columns): 5 tiles compute 1120 (256 computes 1280); 216, which
// divides 1080, does not compile in CUTLASS's sm90 mainloop (27 8-row swizzle atoms). docs/kernels-sm90.md, "Tiles that fit".
// CUTLASS selects wgmma N shapes other than 256/192/128/96/64/32/16/8 only with this defined; without it these
// tiles ran as narrow instructions at half speed (measured, docs/kernels-sm90.md).
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#include "../grouped_gemm.cuh"

namespace engmoe_sm90 {
using Tile_kDgradCoop128x224 = cute::Shape<cute::_128, cute::_224, cute::_64>;
ENGMOE_SM90_DEFINE_CONFIG(kDgradCoop128x224, "cooperative_128x224x64", ENGMOE_SM90_DGRAD, Tile_kDgradCoop128x224, Cooperative)
}  // namespace engmoe_sm90
