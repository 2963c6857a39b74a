// The one CUDA driver function CUTLASS's TMA code calls (cuTensorMapEncodeTiled), looked up once per process.
//
// Why: without CUTLASS_ENABLE_DIRECT_CUDA_DRIVER_CALL, CUTLASS (cutlass/cuda_host_adapter.hpp) resolves the
// driver entry point by name with cudaGetDriverEntryPointByVersion on *every* TMA descriptor it encodes, four
// per grouped-GEMM call; with it, CUTLASS calls the function directly, which would need linking libcuda (absent
// where the library is built: no driver, no stub). So we turn the direct call on and rename it to ours, which
// caches the entry point in a function-local static (thread-safe initialisation). The host time of one call was
// ~0.3 ms on one H200 before (bench/proxy_profile.py's host table, ep4-share, kernel_backend=sm90).
//
// Must come before any CUTLASS header (grouped_gemm.cuh includes it first).
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

inline CUresult engmoe_sm90_cuTensorMapEncodeTiled(
    CUtensorMap* map, CUtensorMapDataType dtype, cuuint32_t rank, void* address, const cuuint64_t* dims,
    const cuuint64_t* strides, const cuuint32_t* box, const cuuint32_t* element_strides,
    CUtensorMapInterleave interleave, CUtensorMapSwizzle swizzle, CUtensorMapL2promotion l2,
    CUtensorMapFloatOOBfill oob_fill) {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      p = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  if (fn == nullptr) return CUDA_ERROR_NOT_FOUND;
  return fn(map, dtype, rank, address, dims, strides, box, element_strides, interleave, swizzle, l2, oob_fill);
}

#define CUTLASS_ENABLE_DIRECT_CUDA_DRIVER_CALL 1
#define cuTensorMapEncodeTiled engmoe_sm90_cuTensorMapEncodeTiled
