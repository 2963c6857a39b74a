// engmoe grouped-expert kernels: launchers over raw pointers (no torch headers, so nvcc compiles fast).
//
// Layout conventions (see engmoe/kernels/reference.py):
//   * T tokens, k routed slots per token; a "slot" s = t*k + j.
//   * slot_to_row[s] is the row of the expert-sorted ("permuted") tensor that slot s occupies;
//     sorted_slots is its inverse. A negative slot_to_row marks a dropped slot (ignored everywhere).
//   * Every kernel writes each output element exactly once and reduces in a fixed order: no float
//     atomics, so forward and backward are bitwise deterministic.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace engmoe {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// ---- routing: stable counting sort of (token, slot) pairs by expert id -------------------------------
// idx: [n] expert ids (int32 or int64). Writes sorted_slots[n], slot_to_row[n], tokens_per_expert[E].
// workspace: routing_workspace_elems(n, E) int32 entries.
int64_t routing_workspace_elems(int64_t n, int num_experts);
cudaError_t launch_routing_maps(const void* idx, bool idx_int64, int64_t n, int num_experts,
                                int64_t* sorted_slots, int64_t* slot_to_row, int64_t* tokens_per_expert,
                                int32_t* workspace, cudaStream_t stream);

// ---- permute: out[slot_to_row[t*k+j], :] = x[t, :] (scatter form: x is read once) -------------------
cudaError_t launch_permute(DType dt, const void* x, const int64_t* slot_to_row, void* out, int64_t T, int k,
                           int64_t H, bool vec_ok, cudaStream_t stream);

// ---- unpermute: out[t, :] = sum_j p[t, j] * y[slot_to_row[t*k+j], :]  (p == nullptr: p = 1) ------------
cudaError_t launch_unpermute(DType dt, const void* y, const int64_t* slot_to_row, const float* probs, void* out,
                           int64_t T, int k, int64_t H, bool vec_ok, cudaStream_t stream);

// ---- unpermute backward: grad_y[slot_to_row[t*k+j], :] = p[t, j] * g[t, :];
//      grad_probs[t, j] = <g[t, :], y[slot_to_row[t*k+j], :]>  (only when y and grad_probs are given) ---
cudaError_t launch_unpermute_bwd(DType dt, const void* g, const void* y, const int64_t* slot_to_row,
                               const float* probs, void* grad_y, float* grad_probs, int64_t T, int k, int64_t H,
                               bool vec_ok, cudaStream_t stream);

// ---- SwiGLU with optional per-row scale: out[r, f] = silu(h[r, f]) * h[r, F + f] * s[r] -----------------
cudaError_t launch_swiglu(DType dt, const void* h, const float* scale, void* out, int64_t N, int64_t F, bool vec_ok,
                          cudaStream_t stream);
cudaError_t launch_swiglu_bwd(DType dt, const void* grad_out, const void* h, const float* scale, void* grad_h,
                              float* grad_scale, int64_t N, int64_t F, bool vec_ok, cudaStream_t stream);

// ---- router: softmax over E experts, top-k (ties: lower expert id first), optional renormalisation ------
cudaError_t launch_router_topk(const float* logits, float* probs, float* topk_probs, int64_t* topk_idx, int64_t T,
                                int E, int k, bool renorm, cudaStream_t stream);
cudaError_t launch_router_topk_bwd(const float* grad_probs, const float* grad_topk, const float* probs,
                                    const float* topk_probs, const int64_t* topk_idx, float* grad_logits, int64_t T,
                                    int E, int k, bool renorm, cudaStream_t stream);

// ---- cross-entropy over a row of (vocab-parallel shard) logits, fp32 math on any float logits -------------
// stats: row_max[r], row_sumexp[r] = sum_j exp(x[r, j] - row_max[r]), row_target[r] = x[r, t - vocab_start]
// when the target t falls in this shard, else 0. The global max and sum-exp are combined from these (over the
// tensor-parallel ranks) by the caller.
cudaError_t launch_cross_entropy_stats(DType dt, const void* logits, const int64_t* target, float* row_max, float* row_sumexp,
                            float* row_target, int64_t N, int64_t V, int64_t vocab_start, bool vec_ok,
                            cudaStream_t stream);
// backward, in place allowed (grad_logits may equal logits):
//   (exp(x - row_max[r]) * inv_sumexp[r] - [j == t]) * grad[r]   with the global (all-shard) max and sum-exp:
// the softmax as exp(x - max) / sum, not exp(x - lse), whose rounded lse would cost ~1e-6 relative in fp32
cudaError_t launch_cross_entropy_backward(DType dt, const void* logits, const int64_t* target, const float* row_max,
                          const float* inv_sumexp, const float* grad, void* grad_logits, int64_t N, int64_t V,
                          int64_t vocab_start, bool vec_ok, cudaStream_t stream);

constexpr int kMaxRoutingExperts = 1024;
constexpr int kMaxRouterExperts = 256;

}  // namespace engmoe
