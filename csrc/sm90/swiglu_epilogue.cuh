// The up-projection's fused epilogue (kind ENGMOE_SM90_FWD_SWIGLU): from the fp32 accumulators of x @ w13_il it
// writes h = [gate | up] (bf16, what the SwiGLU backward reads) and act = silu(gate) * up * scale[row] (bf16), so
// the separate SwiGLU kernel and its read of h disappear. docs/kernels-sm90.md, "SwiGLU in the epilogue".
//
// Why an interleaved weight: a tile holds a block of output columns, and SwiGLU pairs column j of the gate half
// with column j of the up half, 1080 columns apart. With w13's columns interleaved in blocks of 8 (block 2b = gate
// columns 8b..8b+7, block 2b+1 = the same up columns; engmoe.kernels.sm90_gemm.interleave_gate_up), wgmma's
// accumulator layout gives every thread both members of its pairs: a thread holds columns 2q, 2q+1 of every
// 8-column block of its rows (CUTLASS's 64xN GMMA C layout, value mode (2, 2, N/8)), so block 2b and 2b+1 are
// value indices (v, r, 2b) and (v, r, 2b+1) of one thread: the arithmetic needs no shared memory.
//
// Stores go from registers to global memory, 16 bytes per lane after a transpose within each quad (a first
// version stored 32-bit column pairs and ran the up-projection 8 % slower than the unfused GEMM + SwiGLU kernel:
// 8 half-sector transactions per warp store), bounded by the group's rows and the interleaved width. h is
// bit-identical to the unfused GEMM's; act rounds like csrc/moe_kernels.cu's swiglu kernel (gate and up rounded to
// bf16 first, fp32 math) with a fast sigmoid (below), within one bf16 ulp of it.
#pragma once

#include <cuda_bf16.h>

#include "cute/tensor.hpp"
#include "cutlass/bfloat16.h"
#include "cutlass/cutlass.h"
#include "cutlass/detail/layout.hpp"
#include "cutlass/epilogue/dispatch_policy.hpp"
#include "cutlass/gemm/gemm.h"

namespace engmoe_sm90 {

// A stand-in for CUTLASS's thread-level epilogue op: GemmUniversalAdapter only reads these types from it.
struct SwigluThreadOp {
  using ElementOutput = cutlass::bfloat16_t;
  using ElementAccumulator = float;
  using ElementCompute = float;
  using ElementD = cutlass::bfloat16_t;
  struct Params {};
};

// The hardware exp2 and reciprocal (MUFU): in a GEMM epilogue the SwiGLU arithmetic is not hidden behind memory
// traffic as in the stand-alone kernel, and the IEEE expf and division cost the fused kernel 2-7 % (measured,
// docs/kernels-sm90.md); their ~1e-6 relative error is far below bf16's rounding of act.
__device__ __forceinline__ float sigmoid(float x) { return __fdividef(1.0f, 1.0f + __expf(-x)); }

__device__ __forceinline__ uint32_t bits(__nv_bfloat162 v) { return *reinterpret_cast<uint32_t*>(&v); }

// A 4x4 transpose of 32-bit words over the 4 lanes of a quad: lane q holds word k = columns (2q, 2q+1) of block k;
// it returns the 4 words of block q (its 8 columns, in order). Two butterfly steps (lane ^ 1, lane ^ 2).
__device__ __forceinline__ uint4 quad_transpose(const uint32_t (&a)[4], int q) {
  const bool odd = q & 1;
  const uint32_t r0 = __shfl_xor_sync(0xffffffffu, odd ? a[0] : a[1], 1);
  const uint32_t r1 = __shfl_xor_sync(0xffffffffu, odd ? a[2] : a[3], 1);
  // c0: 4 columns of block (q & 1), c1: of block 2 + (q & 1); the first or the second half by q & 2
  const uint32_t c0lo = odd ? r0 : a[0], c0hi = odd ? a[1] : r0;
  const uint32_t c1lo = odd ? r1 : a[2], c1hi = odd ? a[3] : r1;
  const bool upper = q & 2;
  const uint32_t u0 = __shfl_xor_sync(0xffffffffu, upper ? c0lo : c1lo, 2);
  const uint32_t u1 = __shfl_xor_sync(0xffffffffu, upper ? c0hi : c1hi, 2);
  return upper ? make_uint4(u0, u1, c1lo, c1hi) : make_uint4(c0lo, c0hi, u0, u1);
}

class SwigluEpilogue {
 public:
  using EpilogueSchedule = cutlass::epilogue::PtrArrayNoSmemWarpSpecialized;
  using DispatchPolicy = EpilogueSchedule;
  using ThreadEpilogueOp = SwigluThreadOp;
  using ElementOutput = cutlass::bfloat16_t;
  using ElementAccumulator = float;
  using ElementCompute = float;
  using ElementScalar = float;
  using ElementC = cutlass::bfloat16_t;  // no source operand; a type the kernel's aliases can name
  using ElementD = cutlass::bfloat16_t;
  using StrideC = cutlass::detail::TagToStrideC_t<cutlass::layout::RowMajor*>;
  using StrideD = StrideC;
  using InternalStrideC = cute::remove_pointer_t<StrideC>;
  using InternalStrideD = InternalStrideC;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;

  struct SharedStorage {};
  using TensorMapStorage = SharedStorage;

  // Per group e: h rows (width N = 2 F), act rows (width F), the rows' scales (nullptr: scale 1).
  struct Arguments {
    ElementD** ptr_h = nullptr;
    ElementD** ptr_act = nullptr;
    float const** ptr_scale = nullptr;
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&, int) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.ptr_h != nullptr && args.ptr_act != nullptr;
  }

  CUTLASS_HOST_DEVICE explicit SwigluEpilogue(Params const& p) : params(p) {}

  CUTLASS_DEVICE bool is_source_needed() { return false; }

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
            class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_MNK,
                                 BlockCoordMNKL blk_coord_mnkl, cute::Tensor<FrgEngine, FrgLayout> const& acc,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    using namespace cute;
    static_assert(is_static<FrgLayout>::value, "accumulator layout must be static");
    static_assert(rank(FrgLayout{}) == 3, "accumulators: (MMA, MMA_M, MMA_N)");
    // the GMMA C fragment of one atom: (2 adjacent columns, rows +0/+8, 8-column blocks)
    static_assert(rank<0>(FrgLayout{}) == 3 && size<0, 0>(FrgLayout{}) == 2 && size<0, 1>(FrgLayout{}) == 2,
                  "expected the 64xN GMMA accumulator layout");
    constexpr int kBlocks = size<0, 2>(FrgLayout{});
    static_assert(kBlocks % 8 == 0, "the atom's N must hold groups of 4 gate/up block pairs (a multiple of 64)");

    const int M = get<0>(problem_shape_mnkl);
    const int N = get<1>(problem_shape_mnkl);  // interleaved width 2 F
    const int F = N / 2;
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord_mnkl;
    ElementD* h = params.ptr_h[l_coord];
    ElementD* act = params.ptr_act[l_coord];
    float const* scale = params.ptr_scale != nullptr ? params.ptr_scale[l_coord] : nullptr;

    auto thr_mma = tiled_mma.get_thread_slice(thread_idx);
    Tensor cD = local_tile(make_identity_tensor(make_shape(M, N)), take<0, 2>(blk_shape_MNK),
                           make_coord(m_coord, n_coord));
    Tensor tCcD = thr_mma.partition_C(cD);  // (row, interleaved column) of each accumulator
    const int q = thread_idx & 3;           // the lane's column pair within each 8-column block

    // Four gate blocks (and their up blocks) at a time: the quad's lanes hold 2 columns of each, a 4-lane
    // transpose (quad_transpose) gives lane q all 8 columns of gate block q, so each output row takes one 16-byte
    // store per lane and a quad writes 64 contiguous bytes. The shuffles run on every lane; only stores are bounded.
    CUTLASS_PRAGMA_UNROLL
    for (int mi = 0; mi < size<1>(acc); ++mi) {
      CUTLASS_PRAGMA_UNROLL
      for (int ni = 0; ni < size<2>(acc); ++ni) {
        CUTLASS_PRAGMA_UNROLL
        for (int r = 0; r < 2; ++r) {
          const int m = get<0>(tCcD(make_coord(make_coord(0, r, 0), mi, ni)));
          const bool row_ok = m < M;
          const float s = scale != nullptr && row_ok ? scale[m] : 1.0f;
          const int64_t row = static_cast<int64_t>(row_ok ? m : 0);
          CUTLASS_PRAGMA_UNROLL
          for (int grp = 0; grp < kBlocks / 8; ++grp) {
            uint32_t hg[4], hu[4], ha[4];
            CUTLASS_PRAGMA_UNROLL
            for (int k = 0; k < 4; ++k) {
              const int b = 4 * grp + k;  // gate block b: fragment block 2b, its up block 2b + 1
              const __nv_bfloat162 g = __floats2bfloat162_rn(acc(make_coord(make_coord(0, r, 2 * b), mi, ni)),
                                                             acc(make_coord(make_coord(1, r, 2 * b), mi, ni)));
              const __nv_bfloat162 u = __floats2bfloat162_rn(acc(make_coord(make_coord(0, r, 2 * b + 1), mi, ni)),
                                                             acc(make_coord(make_coord(1, r, 2 * b + 1), mi, ni)));
              const float gf0 = __low2float(g), gf1 = __high2float(g);
              const float a0 = gf0 * sigmoid(gf0) * __low2float(u) * s;
              const float a1 = gf1 * sigmoid(gf1) * __high2float(u) * s;
              hg[k] = bits(g);
              hu[k] = bits(u);
              ha[k] = bits(__floats2bfloat162_rn(a0, a1));
            }
            const uint4 vg = quad_transpose(hg, q), vu = quad_transpose(hu, q), va = quad_transpose(ha, q);
            // this lane's gate block: the group's first interleaved column / 16, plus q
            const int c0 = get<1>(tCcD(make_coord(make_coord(0, r, 8 * grp), mi, ni)));
            const int block = ((c0 & ~7) >> 4) + q;
            if (row_ok && block * 16 < N) {
              const int64_t j = static_cast<int64_t>(block) * 8;
              *reinterpret_cast<uint4*>(reinterpret_cast<__nv_bfloat16*>(h) + row * N + j) = vg;
              *reinterpret_cast<uint4*>(reinterpret_cast<__nv_bfloat16*>(h) + row * N + F + j) = vu;
              *reinterpret_cast<uint4*>(reinterpret_cast<__nv_bfloat16*>(act) + row * F + j) = va;
            }
          }
        }
      }
    }
  }

 private:
  Params params;
};

}  // namespace engmoe_sm90
