// Internal contract between the C ABI (api.cu) and the kernel configurations (kernels/*.cu, one per TU so that a
// build can compile them in parallel): a configuration is a name plus two functions. No CUTLASS in here, so
// api.cu compiles in seconds.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>
#include <string>

namespace engmoe_sm90 {

struct Problem {
  int kind;
  const void* a;
  const void* b;
  void* d;
  void* act;           // FWD_SWIGLU: the [rows, n / 2] activation (d is h [rows, n]); nullptr otherwise
  const float* scale;  // FWD_SWIGLU: per-row scale of act (the routing probability) or nullptr
  const void* counts;
  bool counts_is_int64;
  int groups;
  int64_t rows;
  int k;
  int n;
  void* workspace;
  int64_t workspace_bytes;
  int sm_count;
  int device;
  cudaStream_t stream;
};

struct Config {
  const char* name;
  int64_t (*workspace_bytes)(int groups, int sm_count);
  // ENGMOE_SM90_OK or an error code; on error `*error` says why.
  int (*run)(const Problem& p, std::string* error);
};

// One per kernels/*.cu (defined there).
extern const Config kFwdCoop128x256;
extern const Config kFwdPingpong128x128;
extern const Config kDgradCoop128x256;
extern const Config kDgradPingpong128x128;
extern const Config kWgradPingpong128x128;
extern const Config kWgradAccumPingpong128x128;
extern const Config kWgradAccumCoop128x256;
extern const Config kFwdCoop128x256C2x1;
extern const Config kDgradCoop128x256C2x1;
extern const Config kWgradAccumCoop128x256C2x1;
extern const Config kWgradAccumCoop128x256C1x2;
extern const Config kFwdCoop256x128;
// dgrad tiles whose N fits the expert widths (2880: exactly; 1080: 40 columns over; docs/kernels-sm90.md)
extern const Config kDgradCoop128x240;
extern const Config kDgradCoop128x224;
extern const Config kDgradCoop128x240C2x1;
// N 192 (a multiple of 64: the N-contiguous B keeps its 128-byte swizzle) divides 2880 exactly
extern const Config kFwdCoop128x192;
extern const Config kFwdCoop128x192C2x1;
extern const Config kWgradAccumCoop128x192;
// the bf16 weight gradient on the cooperative schedule
extern const Config kWgradCoop128x256;
extern const Config kWgradCoop128x192;
// the up-projection with SwiGLU and the routing probability in the epilogue (swiglu_epilogue.cuh)
extern const Config kFwdSwigluCoop256x128;
extern const Config kFwdSwigluCoop128x256C2x1;
extern const Config kFwdSwigluCoop128x128;

}  // namespace engmoe_sm90
