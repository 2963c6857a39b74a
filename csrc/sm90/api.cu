// The C ABI of libengmoe_sm90.so (see engmoe_sm90.h): the table of compiled configurations per GEMM kind and the
// checks every call makes before a kernel is launched (no CUTLASS here, the configurations live in kernels/*.cu).
#include <cuda_runtime.h>

#include <mutex>
#include <string>

#include "dispatch.h"
#include "engmoe_sm90.h"

namespace engmoe_sm90 {
namespace {

// Index 0 of each kind is its default (engmoe/kernels/sm90_gemm.py may pick another by name for benchmarking).
// New configurations are appended, so an existing one keeps its index.
const Config* const kFwd[] = {&kFwdCoop128x256, &kFwdPingpong128x128, &kFwdCoop128x256C2x1, &kFwdCoop256x128,
                              &kFwdCoop128x192,    &kFwdCoop128x192C2x1};
const Config* const kDgrad[] = {&kDgradCoop128x256,  &kDgradPingpong128x128, &kDgradCoop128x256C2x1,
                                &kDgradCoop128x240,  &kDgradCoop128x224,     &kDgradCoop128x240C2x1};
const Config* const kWgrad[] = {&kWgradPingpong128x128, &kWgradCoop128x256, &kWgradCoop128x192};
const Config* const kWgradAccum[] = {&kWgradAccumPingpong128x128, &kWgradAccumCoop128x256, &kWgradAccumCoop128x256C2x1,
                                     &kWgradAccumCoop128x256C1x2, &kWgradAccumCoop128x192};
const Config* const kFwdSwiglu[] = {&kFwdSwigluCoop256x128, &kFwdSwigluCoop128x256C2x1, &kFwdSwigluCoop128x128};

struct Table {
  const Config* const* configs;
  int count;
};

Table table(int kind) {
  switch (kind) {
    case ENGMOE_SM90_FWD: return {kFwd, static_cast<int>(sizeof(kFwd) / sizeof(kFwd[0]))};
    case ENGMOE_SM90_DGRAD: return {kDgrad, static_cast<int>(sizeof(kDgrad) / sizeof(kDgrad[0]))};
    case ENGMOE_SM90_WGRAD: return {kWgrad, static_cast<int>(sizeof(kWgrad) / sizeof(kWgrad[0]))};
    case ENGMOE_SM90_WGRAD_ACCUM:
      return {kWgradAccum, static_cast<int>(sizeof(kWgradAccum) / sizeof(kWgradAccum[0]))};
    case ENGMOE_SM90_FWD_SWIGLU: return {kFwdSwiglu, static_cast<int>(sizeof(kFwdSwiglu) / sizeof(kFwdSwiglu[0]))};
    default: return {nullptr, 0};
  }
}

const Config* lookup(int kind, int config) {
  Table t = table(kind);
  if (config < 0) config = 0;
  return config < t.count ? t.configs[config] : nullptr;
}

thread_local std::string g_error;

int fail(int code, std::string msg) {
  g_error = std::move(msg);
  return code;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// The checks every call makes (sizes, TMA's alignment, int32 rows), then the configuration's run.
int checked_run(Problem const& p, int config) {
  const int kind = p.kind, groups = p.groups, k = p.k, n = p.n, sm_count = p.sm_count, device = p.device;
  const int64_t rows = p.rows;
  const void *a = p.a, *b = p.b, *d = p.d, *counts = p.counts, *workspace = p.workspace;
  const Config* c = lookup(kind, config);
  if (c == nullptr) return fail(ENGMOE_SM90_EINVAL, "unknown kind/config " + std::to_string(kind) + "/" +
                                                         std::to_string(config));
  if (groups <= 0 || rows < 0 || k <= 0 || n <= 0 || sm_count <= 0 || device < 0) {
    return fail(ENGMOE_SM90_EINVAL, "bad sizes: groups " + std::to_string(groups) + ", rows " + std::to_string(rows) +
                                        ", k " + std::to_string(k) + ", n " + std::to_string(n) + ", sm_count " +
                                        std::to_string(sm_count));
  }
  // TMA: 16-byte aligned base addresses and row pitches (bf16 rows of k and n elements; fp32 main_grad rows of n)
  if (k % 8 != 0 || n % 8 != 0) return fail(ENGMOE_SM90_EINVAL, "k and n must be multiples of 8 (16-byte rows)");
  if (a == nullptr || b == nullptr || d == nullptr || counts == nullptr) {
    return fail(ENGMOE_SM90_EINVAL, "null operand pointer");
  }
  if (!aligned16(a) || !aligned16(b) || !aligned16(d) || !aligned16(workspace)) {
    return fail(ENGMOE_SM90_EINVAL, "operands and workspace must be 16-byte aligned");
  }
  if (rows > (int64_t{1} << 31) - 1) return fail(ENGMOE_SM90_EINVAL, "rows must fit in int32 (CUTLASS problem shape)");
  std::string err;
  int rc = c->run(p, &err);
  if (rc != ENGMOE_SM90_OK) return fail(rc, std::string(c->name) + ": " + err);
  return ENGMOE_SM90_OK;
}

}  // namespace
}  // namespace engmoe_sm90

using namespace engmoe_sm90;

extern "C" {

int engmoe_sm90_abi_version(void) { return ENGMOE_SM90_ABI_VERSION; }

int engmoe_sm90_compiled_for_sm90a(void) {
#if defined(ENGMOE_SM90_HAVE_SM90A)
  return 1;
#else
  return 0;
#endif
}

int engmoe_sm90_num_configs(int kind) { return table(kind).count; }

int engmoe_sm90_default_config(int kind) { return table(kind).count > 0 ? 0 : -1; }

const char* engmoe_sm90_config_name(int kind, int config) {
  Table t = table(kind);
  return config >= 0 && config < t.count ? t.configs[config]->name : nullptr;
}

int64_t engmoe_sm90_workspace_bytes(int kind, int config, int groups, int sm_count) {
  const Config* c = lookup(kind, config);
  if (c == nullptr || groups <= 0 || sm_count <= 0) return -1;
  return c->workspace_bytes(groups, sm_count);
}

int engmoe_sm90_sm_count(int device) {
  static std::mutex mu;
  static int cached[64] = {0};
  if (device < 0) return -1;
  std::lock_guard<std::mutex> lock(mu);
  if (device < 64 && cached[device] > 0) return cached[device];
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  if (device < 64) cached[device] = n;
  return n;
}

int engmoe_sm90_run(int kind, int config, const void* a, const void* b, void* d, const void* counts,
                    int counts_is_int64, int groups, int64_t rows, int k, int n, void* workspace,
                    int64_t workspace_bytes, int sm_count, int device, void* stream) {
  if (kind == ENGMOE_SM90_FWD_SWIGLU) return fail(ENGMOE_SM90_EINVAL, "the SwiGLU kind runs by engmoe_sm90_run_swiglu");
  Problem p{kind, a, b, d, nullptr, nullptr, counts, counts_is_int64 != 0, groups, rows, k, n, workspace,
            workspace_bytes, sm_count, device, static_cast<cudaStream_t>(stream)};
  return checked_run(p, config);
}

int engmoe_sm90_run_swiglu(int config, const void* x, const void* w_il, void* h, void* act, const float* scale,
                           const void* counts, int counts_is_int64, int groups, int64_t rows, int k, int n,
                           void* workspace, int64_t workspace_bytes, int sm_count, int device, void* stream) {
  if (n % 16 != 0) return fail(ENGMOE_SM90_EINVAL, "n must be a multiple of 16 (whole 8-column gate/up pairs)");
  if (act == nullptr || !aligned16(act)) return fail(ENGMOE_SM90_EINVAL, "act must be a 16-byte aligned pointer");
  if (scale != nullptr && (reinterpret_cast<uintptr_t>(scale) & 3u) != 0) {
    return fail(ENGMOE_SM90_EINVAL, "scale must be 4-byte aligned");
  }
  Problem p{ENGMOE_SM90_FWD_SWIGLU, x, w_il, h, act, scale, counts, counts_is_int64 != 0, groups, rows, k, n,
            workspace, workspace_bytes, sm_count, device, static_cast<cudaStream_t>(stream)};
  return checked_run(p, config);
}

const char* engmoe_sm90_last_error(void) { return g_error.c_str(); }

}  // extern "C"
