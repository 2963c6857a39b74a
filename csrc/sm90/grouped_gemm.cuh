// One expert grouped GEMM configuration on CUTLASS 3.x (sm_90a): the ptr-array grouped kernel (TMA loads, wgmma,
// warp-specialized cooperative or ping-pong consumers, the persistent group tile scheduler) with device-side problem
// shapes only, and the small kernel that builds its per-group arguments from the group sizes on the device.
//
// Why device-side shapes: the MoE layer knows its group sizes only on the device (the routing kernel counts them);
// reading them on the host would stall the launch queue once per GEMM. The number of groups is the only host value,
// so one call is two launches on the caller's stream and can be captured in a CUDA graph.
//
// Included by exactly one kernels/*.cu per configuration (the instantiation is the slow part of the build).
#pragma once

#include "driver_shim.h"  // first: it configures how CUTLASS calls the driver

#include <cuda_runtime.h>
#include <stdint.h>

#include <mutex>
#include <string>
#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/bfloat16.h"
#include "cutlass/cutlass.h"
#include "cutlass/device_kernel.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

#include "dispatch.h"
#include "engmoe_sm90.h"
#include "swiglu_epilogue.cuh"

namespace engmoe_sm90 {

using bf16 = cutlass::bfloat16_t;
using RowMajor = cutlass::layout::RowMajor;
using ColumnMajor = cutlass::layout::ColumnMajor;

struct Cooperative {
  using Kernel = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using Epilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
};
struct Pingpong {
  using Kernel = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
  using Epilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
};

// Operand layouts per kind. CUTLASS's B is the K x N operand, so ColumnMajor B means "K contiguous". With the expert
// weight w row-major [K, N]: fwd reads it N-contiguous (RowMajor B), dgrad (w^T) K-contiguous (ColumnMajor B); wgrad
// reads x [rows, K] as the M x K operand with M contiguous (ColumnMajor A) and dy [rows, N] N-contiguous.
template <int Kind>
struct KindTraits;
template <>
struct KindTraits<ENGMOE_SM90_FWD> {
  using LayoutA = RowMajor;
  using LayoutB = RowMajor;
  using ElementC = void;
  using ElementD = bf16;
};
template <>
struct KindTraits<ENGMOE_SM90_FWD_SWIGLU> : KindTraits<ENGMOE_SM90_FWD> {};  // B = the interleaved w13
template <>
struct KindTraits<ENGMOE_SM90_DGRAD> {
  using LayoutA = RowMajor;
  using LayoutB = ColumnMajor;
  using ElementC = void;
  using ElementD = bf16;
};
template <>
struct KindTraits<ENGMOE_SM90_WGRAD> {
  using LayoutA = ColumnMajor;
  using LayoutB = RowMajor;
  using ElementC = void;
  using ElementD = bf16;
};
template <>
struct KindTraits<ENGMOE_SM90_WGRAD_ACCUM> {
  using LayoutA = ColumnMajor;
  using LayoutB = RowMajor;
  using ElementC = float;  // C = D = main_grad[e], beta = 1
  using ElementD = float;
};

template <class T>
struct TmaAlignment {  // elements per 16 bytes (TMA's alignment unit)
  static constexpr int value = 128 / cutlass::sizeof_bits<T>::value;
};
template <>
struct TmaAlignment<void> {
  static constexpr int value = 8;  // unused: no source operand
};

constexpr size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// A stride with one dynamic leading dimension (the other of the first two modes is the static unit stride).
template <class Stride>
__device__ __forceinline__ Stride leading_stride(int64_t ld) {
  Stride s{};
  using M0 = cute::remove_cvref_t<decltype(cute::get<0>(s))>;
  using M1 = cute::remove_cvref_t<decltype(cute::get<1>(s))>;
  static_assert(cute::is_static<M0>::value != cute::is_static<M1>::value, "expected one dynamic leading stride");
  if constexpr (cute::is_static<M0>::value) {
    cute::get<1>(s) = ld;
  } else {
    cute::get<0>(s) = ld;
  }
  return s;
}

using Cluster1x1 = cute::Shape<cute::_1, cute::_1, cute::_1>;

// ClusterShape: 1x1 by default. A 2-CTA cluster multicasts the operand both CTAs share (2x1: the B tile, i.e. the
// expert weight for fwd/dgrad) through TMA, halving its L2 reads, but rounds each group's tile count along the
// cluster's mode up to even (up to one wasted tile per expert); which wins is measured (docs/kernels-sm90.md).
template <int Kind, class TileShape_, class Schedule, class ClusterShape_ = Cluster1x1>
struct GroupedGemm {
  using Traits = KindTraits<Kind>;
  using TileShape = TileShape_;
  using ClusterShape = ClusterShape_;
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
  using UnderlyingShape = typename ProblemShape::UnderlyingProblemShape;
  using ElementC = typename Traits::ElementC;
  using ElementD = typename Traits::ElementD;
  static constexpr bool kHasSource = !std::is_void_v<ElementC>;
  using ElementCStore = std::conditional_t<kHasSource, ElementC, ElementD>;  // pointer type of the (unused) C array

  static constexpr bool kSwiglu = Kind == ENGMOE_SM90_FWD_SWIGLU;
  using TmaEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, ElementC, RowMajor*,
      TmaAlignment<ElementC>::value, ElementD, RowMajor*, TmaAlignment<ElementD>::value,
      typename Schedule::Epilogue,
      cutlass::epilogue::fusion::LinearCombination<ElementD, float, ElementC, float>>::CollectiveOp;
  // the SwiGLU kind stores from registers (swiglu_epilogue.cuh): no shared memory, so the mainloop gets more stages
  using CollectiveEpilogue = std::conditional_t<
      kSwiglu, cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<SwigluEpilogue>, TmaEpilogue>;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, bf16, typename Traits::LayoutA*, 8, bf16,
      typename Traits::LayoutB*, 8, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Schedule::Kernel>::CollectiveOp;

  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
  using StrideA = typename GemmKernel::InternalStrideA;
  using StrideB = typename GemmKernel::InternalStrideB;
  using StrideC = typename GemmKernel::InternalStrideC;
  using StrideD = typename GemmKernel::InternalStrideD;

  // The per-group argument arrays CUTLASS reads, carved out of the caller's workspace after CUTLASS's own part.
  struct DeviceArgs {
    UnderlyingShape* shapes;
    bf16 const** ptr_a;
    bf16 const** ptr_b;
    ElementCStore const** ptr_c;
    ElementD** ptr_d;
    StrideA* stride_a;
    StrideB* stride_b;
    StrideC* stride_c;
    StrideD* stride_d;
    bf16** ptr_act;           // FWD_SWIGLU: the activation rows of each group (ptr_d: its h rows)
    float const** ptr_scale;  // FWD_SWIGLU: the rows' routing probabilities, nullptr for none
  };

  static size_t args_bytes(int groups, DeviceArgs* out, char* base) {
    size_t o = 0;
    auto take = [&](size_t bytes) -> char* {
      size_t at = o;
      o = round_up(o + bytes, 128);
      return base != nullptr ? base + at : nullptr;
    };
    const size_t g = static_cast<size_t>(groups);
    char* shapes = take(g * sizeof(UnderlyingShape));
    char* pa = take(g * sizeof(void*));
    char* pb = take(g * sizeof(void*));
    char* pc = take(g * sizeof(void*));
    char* pd = take(g * sizeof(void*));
    char* sa = take(g * sizeof(StrideA));
    char* sb = take(g * sizeof(StrideB));
    char* sc = take(g * sizeof(StrideC));
    char* sd = take(g * sizeof(StrideD));
    char* pact = take(g * sizeof(void*));
    char* pscale = take(g * sizeof(void*));
    if (out != nullptr) {
      *out = DeviceArgs{reinterpret_cast<UnderlyingShape*>(shapes), reinterpret_cast<bf16 const**>(pa),
                        reinterpret_cast<bf16 const**>(pb), reinterpret_cast<ElementCStore const**>(pc),
                        reinterpret_cast<ElementD**>(pd), reinterpret_cast<StrideA*>(sa),
                        reinterpret_cast<StrideB*>(sb), reinterpret_cast<StrideC*>(sc),
                        reinterpret_cast<StrideD*>(sd), reinterpret_cast<bf16**>(pact),
                        reinterpret_cast<float const**>(pscale)};
    }
    return o;
  }

  static typename Gemm::Arguments make_arguments(int groups, DeviceArgs const& da, int device, int sm_count,
                                                 bool has_scale = false) {
    cutlass::KernelHardwareInfo hw;
    hw.device_id = device;
    hw.sm_count = sm_count;
    if constexpr (kSwiglu) {
      return typename Gemm::Arguments{cutlass::gemm::GemmUniversalMode::kGrouped,
                                      {groups, da.shapes, nullptr},
                                      {da.ptr_a, da.stride_a, da.ptr_b, da.stride_b},
                                      {da.ptr_d, da.ptr_act, has_scale ? da.ptr_scale : nullptr},
                                      hw};
    } else {
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGrouped,
        {groups, da.shapes, nullptr},  // no host problem shapes: the scheduler reads them on the device
        {da.ptr_a, da.stride_a, da.ptr_b, da.stride_b},
        {{}, kHasSource ? reinterpret_cast<ElementC const**>(da.ptr_c) : nullptr,
         kHasSource ? da.stride_c : nullptr, da.ptr_d, da.stride_d},
        hw};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = kHasSource ? 1.0f : 0.0f;
    return args;
    }
  }

  static int64_t cutlass_workspace_bytes(int groups, int sm_count) {
    DeviceArgs none{};
    auto args = make_arguments(groups, none, 0, sm_count);
    return static_cast<int64_t>(Gemm::get_workspace_size(args));
  }

  static int64_t workspace_bytes(int groups, int sm_count) {
    if (groups <= 0 || sm_count <= 0) return -1;
    return static_cast<int64_t>(round_up(cutlass_workspace_bytes(groups, sm_count), 256) +
                                args_bytes(groups, nullptr, nullptr));
  }
};

// ----------------------------------------------------------------------------------------------------------------
// the argument-building kernel
// ----------------------------------------------------------------------------------------------------------------
struct BuildParams {
  const bf16* a;
  const bf16* b;
  void* d;
  bf16* act;          // FWD_SWIGLU only
  const float* scale;  // FWD_SWIGLU only; may be nullptr
  const void* counts;
  bool counts_is_int64;
  int groups;
  int64_t rows;
  int k;
  int n;
};

__device__ __forceinline__ int64_t load_count(BuildParams const& p, int e) {
  int64_t c = p.counts_is_int64 ? static_cast<const int64_t*>(p.counts)[e] : static_cast<const int32_t*>(p.counts)[e];
  return c > 0 ? c : 0;
}

// Group e's rows [start, start + rows_e) after clamping the running sum to the row count (a count vector that sums
// past `rows` must not make the GEMM read or write out of bounds).
__device__ __forceinline__ void clamp_group(int64_t start, int64_t count, int64_t rows, int64_t* s, int64_t* c) {
  *s = start < rows ? start : rows;
  *c = count < rows - *s ? count : rows - *s;
}

template <int Kind, class G>
__device__ __forceinline__ void write_group(typename G::DeviceArgs const& da, BuildParams const& p, int e,
                                            int64_t start, int64_t cnt) {
  using ElementD = typename G::ElementD;
  const int64_t K = p.k, N = p.n;
  ElementD* d = static_cast<ElementD*>(p.d);
  int m, n, k;
  int64_t lda, ldb, ldd;
  const bf16 *pa, *pb;
  ElementD* pd;
  if constexpr (Kind == ENGMOE_SM90_FWD || Kind == ENGMOE_SM90_FWD_SWIGLU) {  // [cnt, K] @ [K, N]
    m = static_cast<int>(cnt), n = p.n, k = p.k;
    pa = p.a + start * K, pb = p.b + e * K * N, pd = d + start * N;
    lda = K, ldb = N, ldd = N;
  } else if constexpr (Kind == ENGMOE_SM90_DGRAD) {  // [cnt, N] @ [K, N]^T
    m = static_cast<int>(cnt), n = p.k, k = p.n;
    pa = p.a + start * N, pb = p.b + e * K * N, pd = d + start * K;
    lda = N, ldb = N, ldd = K;
  } else {  // [rows_e, K]^T @ [rows_e, N]; an empty expert gets no tiles at all (M = 0), so main_grad[e] is untouched
    m = cnt > 0 ? p.k : 0, n = p.n, k = static_cast<int>(cnt);
    pa = p.a + start * K, pb = p.b + start * N, pd = d + e * K * N;
    lda = K, ldb = N, ldd = N;
  }
  da.shapes[e] = cute::make_shape(m, n, k);
  da.ptr_a[e] = pa;
  da.ptr_b[e] = pb;
  da.ptr_d[e] = pd;
  da.stride_a[e] = leading_stride<typename G::StrideA>(lda);
  da.stride_b[e] = leading_stride<typename G::StrideB>(ldb);
  da.stride_d[e] = leading_stride<typename G::StrideD>(ldd);
  if constexpr (Kind == ENGMOE_SM90_FWD_SWIGLU) {  // act [rows, N / 2], scale [rows]
    da.ptr_act[e] = p.act + start * (N / 2);
    da.ptr_scale[e] = p.scale != nullptr ? p.scale + start : nullptr;
  }
  if constexpr (G::kHasSource) {
    da.ptr_c[e] = pd;  // in place: C = D
    da.stride_c[e] = leading_stride<typename G::StrideC>(ldd);
  }
}

__device__ __forceinline__ void zero_bytes(char* p, int64_t bytes, int64_t part, int64_t parts) {
  // 16-byte stores over this block's share; `p` and `bytes` are multiples of 16 (checked on the host).
  const int64_t vecs = bytes / 16;
  const int64_t per = (vecs + parts - 1) / parts;
  const int64_t lo = part * per, hi = lo + per < vecs ? lo + per : vecs;
  uint4* v = reinterpret_cast<uint4*>(p);
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) v[i] = make_uint4(0, 0, 0, 0);
}

// Block 0, warp 0: a running sum over the group sizes, 32 groups at a time, and each lane writes its group's
// arguments. Blocks 1..: bf16 outputs CUTLASS does not write (fwd/dgrad rows past the last group, wgrad's
// empty experts) are zeroed, so every output element is defined.
template <int Kind, class G>
__global__ void __launch_bounds__(256) build_args_kernel(typename G::DeviceArgs da, BuildParams p) {
  __shared__ int64_t s_total;
  __shared__ int s_empty[32];
  const int lane = threadIdx.x & 31;
  const bool builder = blockIdx.x == 0;
  if (builder && threadIdx.x >= 32) return;
  int64_t carry = 0;
  for (int base = 0; base < p.groups; base += 32) {
    const int e = base + lane;
    int64_t c = 0, incl = 0;
    if (threadIdx.x < 32) {
      c = e < p.groups ? load_count(p, e) : 0;
      incl = c;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int64_t v = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += v;
      }
      int64_t s, cnt;
      clamp_group(carry + incl - c, c, p.rows, &s, &cnt);
      carry += __shfl_sync(0xffffffffu, incl, 31);
      if (builder) {
        if (e < p.groups) write_group<Kind, G>(da, p, e, s, cnt);
      } else if (Kind == ENGMOE_SM90_WGRAD) {
        s_empty[lane] = e < p.groups && cnt == 0;
      }
    }
    if (!builder && Kind == ENGMOE_SM90_WGRAD) {
      __syncthreads();
      const int64_t bytes = static_cast<int64_t>(p.k) * p.n * sizeof(bf16);
      for (int j = 0; j < 32; ++j) {
        if (s_empty[j]) {
          zero_bytes(static_cast<char*>(p.d) + (base + j) * bytes, bytes, blockIdx.x - 1, gridDim.x - 1);
        }
      }
      __syncthreads();
    }
  }
  if (builder) return;
  if constexpr (Kind == ENGMOE_SM90_FWD || Kind == ENGMOE_SM90_DGRAD || Kind == ENGMOE_SM90_FWD_SWIGLU) {
    if (threadIdx.x == 0) s_total = carry < p.rows ? carry : p.rows;
    __syncthreads();
    const int64_t cols = Kind == ENGMOE_SM90_DGRAD ? p.k : p.n;
    const int64_t row_bytes = cols * static_cast<int64_t>(sizeof(bf16));
    zero_bytes(static_cast<char*>(p.d) + s_total * row_bytes, (p.rows - s_total) * row_bytes, blockIdx.x - 1,
               gridDim.x - 1);
    if constexpr (Kind == ENGMOE_SM90_FWD_SWIGLU) {  // act rows are N / 2 wide (N % 16 == 0: 16-byte rows)
      zero_bytes(reinterpret_cast<char*>(p.act) + s_total * row_bytes / 2, (p.rows - s_total) * row_bytes / 2,
                 blockIdx.x - 1, gridDim.x - 1);
    }
  }
}

template <class GemmKernel>
cudaError_t ensure_smem_attribute(int device) {
  // once per device: the kernel's dynamic shared memory exceeds the 48 KB default
  static std::mutex mu;
  static uint64_t done = 0;
  std::lock_guard<std::mutex> lock(mu);
  const uint64_t bit = device >= 0 && device < 64 ? (uint64_t{1} << device) : 0;
  if (bit && (done & bit)) return cudaSuccess;
  const int smem = static_cast<int>(GemmKernel::SharedStorageSize);
  if (smem >= (48 << 10)) {
    cudaError_t e = cudaFuncSetAttribute(cutlass::device_kernel<GemmKernel>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
  }
  done |= bit;
  return cudaSuccess;
}

template <int Kind, class G>
int run_grouped(Problem const& p, std::string* error) {
  using Gemm = typename G::Gemm;
  using GemmKernel = typename G::GemmKernel;
  if (p.kind != Kind) {
    *error = "configuration compiled for another GEMM kind";
    return ENGMOE_SM90_EINVAL;
  }
  const int64_t need = G::workspace_bytes(p.groups, p.sm_count);
  if (need < 0 || p.workspace == nullptr || p.workspace_bytes < need) {
    *error = "workspace too small: " + std::to_string(p.workspace_bytes) + " bytes, need " + std::to_string(need);
    return ENGMOE_SM90_EINVAL;
  }
  const size_t cutlass_ws = round_up(static_cast<size_t>(G::cutlass_workspace_bytes(p.groups, p.sm_count)), 256);
  typename G::DeviceArgs da{};
  G::args_bytes(p.groups, &da, static_cast<char*>(p.workspace) + cutlass_ws);

  BuildParams bp{static_cast<const bf16*>(p.a), static_cast<const bf16*>(p.b), p.d, static_cast<bf16*>(p.act),
                 p.scale, p.counts, p.counts_is_int64, p.groups, p.rows, p.k, p.n};
  const int zero_blocks = Kind == ENGMOE_SM90_WGRAD_ACCUM ? 0 : 8;
  build_args_kernel<Kind, G><<<1 + zero_blocks, 256, 0, p.stream>>>(da, bp);
  cudaError_t ce = cudaGetLastError();
  if (ce != cudaSuccess) {
    *error = std::string("argument kernel launch: ") + cudaGetErrorString(ce);
    return ENGMOE_SM90_ECUDA;
  }

  auto args = G::make_arguments(p.groups, da, p.device, p.sm_count, p.scale != nullptr);
  cutlass::Status st = Gemm::can_implement(args);
  if (st != cutlass::Status::kSuccess) {
    *error = std::string("CUTLASS can_implement: ") + cutlassGetStatusString(st);
    return ENGMOE_SM90_EIMPLEMENT;
  }
  st = GemmKernel::initialize_workspace(args, p.workspace, p.stream, nullptr);
  if (st != cutlass::Status::kSuccess) {
    *error = std::string("CUTLASS initialize_workspace: ") + cutlassGetStatusString(st);
    return ENGMOE_SM90_ECUTLASS;
  }
  auto params = GemmKernel::to_underlying_arguments(args, p.workspace);
  ce = ensure_smem_attribute<GemmKernel>(p.device);
  if (ce != cudaSuccess) {
    *error = std::string("cudaFuncSetAttribute: ") + cudaGetErrorString(ce);
    return ENGMOE_SM90_ECUDA;
  }
  st = Gemm::run(params, p.stream);
  if (st != cutlass::Status::kSuccess) {
    ce = cudaGetLastError();
    *error = std::string("CUTLASS run: ") + cutlassGetStatusString(st) + " (" + cudaGetErrorString(ce) + ")";
    return ENGMOE_SM90_ECUTLASS;
  }
  ce = cudaGetLastError();
  if (ce != cudaSuccess) {
    *error = std::string("GEMM launch: ") + cudaGetErrorString(ce);
    return ENGMOE_SM90_ECUDA;
  }
  return ENGMOE_SM90_OK;
}

// Defines `const Config <symbol>` for one (kind, tile, schedule[, cluster]).
#define ENGMOE_SM90_DEFINE_CONFIG(symbol, label, kind, tile, schedule) \
  ENGMOE_SM90_DEFINE_CONFIG_CLUSTER(symbol, label, kind, tile, schedule, ::engmoe_sm90::Cluster1x1)
#define ENGMOE_SM90_DEFINE_CONFIG_CLUSTER(symbol, label, kind, tile, schedule, cluster)                    \
  namespace {                                                                                              \
  using symbol##_G = ::engmoe_sm90::GroupedGemm<kind, tile, schedule, cluster>;                            \
  int64_t symbol##_ws(int groups, int sm_count) { return symbol##_G::workspace_bytes(groups, sm_count); } \
  int symbol##_run(::engmoe_sm90::Problem const& p, std::string* e) {                                      \
    return ::engmoe_sm90::run_grouped<kind, symbol##_G>(p, e);                                             \
  }                                                                                                        \
  }                                                                                                        \
  extern const ::engmoe_sm90::Config symbol{label, symbol##_ws, symbol##_run};

}  // namespace engmoe_sm90
