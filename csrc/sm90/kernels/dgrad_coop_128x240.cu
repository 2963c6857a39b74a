// Instantiates one grouped-GEMM configuration (csrc/sm90/grouped_gemm.cuh): one TU each, so builds run in parallel.
// Tile N 240 divides the up-projection dgrad's 2880 output columns exactly (256 computes 3072). dgrad reads the weight
// K-contiguous, so any N that is a multiple of 8 keeps the 128-byte swizzle. docs/kernels-sm90.md, "Tiles that fit".
// CUTLASS selects wgmma N shapes other than 256/192/128/96/64/32/16/8 only with this defined; without it these
// tiles ran as narrow instructions at half speed (measured, docs/kernels-sm90.md).
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#include "../grouped_gemm.cuh"

namespace engmoe_sm90 {
using Tile_kDgradCoop128x240 = cute::Shape<cute::_128, cute::_240, cute::_64>;
ENGMOE_SM90_DEFINE_CONFIG(kDgradCoop128x240, "cooperative_128x240x64", ENGMOE_SM90_DGRAD, Tile_kDgradCoop128x240, Cooperative)
}  // namespace engmoe_sm90
