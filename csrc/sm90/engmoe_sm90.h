// engmoe's Hopper (sm_90a) grouped GEMM for the experts: the C ABI of libengmoe_sm90.so.
//
// Torch-free on purpose: the library links only against the CUDA runtime, so it builds on a machine with nvcc and
// CUTLASS headers but no GPU and no CUDA torch, and Python drives it through ctypes with raw device pointers and
// the caller's stream (engmoe/kernels/sm90_gemm.py). All operands are bf16 row-major; every call is one launch of a
// small argument-building kernel plus one launch of the persistent grouped GEMM, and reads the group sizes on the
// device only (no host sync, CUDA-graph capturable). The caller provides the workspace (engmoe_sm90_workspace_bytes).
//
// Kinds, with the expert weight w row-major [E, K, N] and the expert-sorted rows of group e at [off_e, off_e+rows_e):
//   ENGMOE_SM90_FWD          d[rows, N]  = a[rows, K] @ b[e]           (a = x,  b = w,  d bf16)
//   ENGMOE_SM90_DGRAD        d[rows, K]  = a[rows, N] @ b[e]^T         (a = dy, b = w,  d bf16)
//   ENGMOE_SM90_WGRAD        d[e]        = a_e^T @ b_e     [K, N]      (a = x [rows, K], b = dy [rows, N], d bf16;
//                                                                       experts with 0 rows get zeros)
//   ENGMOE_SM90_WGRAD_ACCUM  d[e]       += a_e^T @ b_e     [K, N]      (d fp32 main_grad, beta = 1 in the epilogue;
//                                                                       experts with 0 rows are left untouched)
//   ENGMOE_SM90_FWD_SWIGLU   t = a @ b[e] with b the gate/up-interleaved w13 (8-column blocks, swiglu_epilogue.cuh);
//                            h [rows, N] = (gate | up) of t, act [rows, N/2] = silu(gate) * up * scale[row]
//                            (engmoe_sm90_run_swiglu; N a multiple of 16)
// Group sizes: `counts` on the device, int64 or int32; their running sum is clamped to `rows` (memory safety), and
// fwd/dgrad rows past the sum are written as zeros.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ENGMOE_SM90_ABI_VERSION 2

enum {
  ENGMOE_SM90_FWD = 0,
  ENGMOE_SM90_DGRAD = 1,
  ENGMOE_SM90_WGRAD = 2,
  ENGMOE_SM90_WGRAD_ACCUM = 3,
  ENGMOE_SM90_FWD_SWIGLU = 4,
  ENGMOE_SM90_NUM_KINDS = 5
};

// Return codes of engmoe_sm90_run (engmoe_sm90_last_error() has the message of the calling thread's last failure).
enum {
  ENGMOE_SM90_OK = 0,
  ENGMOE_SM90_EINVAL = 1,       // bad kind/config/sizes/pointers/workspace
  ENGMOE_SM90_EIMPLEMENT = 2,   // CUTLASS's can_implement refused the arguments
  ENGMOE_SM90_ECUDA = 3,        // a CUDA runtime error (launch, attribute)
  ENGMOE_SM90_ECUTLASS = 4      // CUTLASS returned another failure
};

int engmoe_sm90_abi_version(void);
// 1 when the kernels were compiled for sm_90a (CUTLASS_ARCH_MMA_SM90A_ENABLED), 0 for a stub build.
int engmoe_sm90_compiled_for_sm90a(void);
int engmoe_sm90_num_configs(int kind);
int engmoe_sm90_default_config(int kind);
// "pingpong_128x128x64" etc.; NULL for an unknown kind/config.
const char* engmoe_sm90_config_name(int kind, int config);
// Bytes of device workspace one call needs (CUTLASS's workspace + the per-group argument arrays); < 0 on error.
int64_t engmoe_sm90_workspace_bytes(int kind, int config, int groups, int sm_count);
// Multiprocessor count of `device` (cached after the first query); < 0 on error.
int engmoe_sm90_sm_count(int device);
int engmoe_sm90_run(int kind, int config, const void* a, const void* b, void* d, const void* counts,
                    int counts_is_int64, int groups, int64_t rows, int k, int n, void* workspace,
                    int64_t workspace_bytes, int sm_count, int device, void* stream);
// The FWD_SWIGLU kind: x [rows, k] @ w_il[e] [k, n] -> h [rows, n] (gate | up), act [rows, n / 2]; scale: fp32
// [rows] or NULL (scale 1). Rows past the sum of the counts are zeros in both outputs.
int engmoe_sm90_run_swiglu(int config, const void* x, const void* w_il, void* h, void* act, const float* scale,
                           const void* counts, int counts_is_int64, int groups, int64_t rows, int k, int n,
                           void* workspace, int64_t workspace_bytes, int sm_count, int device, void* stream);
const char* engmoe_sm90_last_error(void);

#ifdef __cplusplus
}
#endif
