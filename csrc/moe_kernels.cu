// engmoe grouped-expert kernels. Memory-bound data movement (routing sort, permute, unpermute) and the
// SwiGLU activation, each written so that every output element is stored exactly once with a fixed
// reduction order (deterministic, no float atomics), with 16-byte vector accesses where the row size
// and the pointers allow it. See moe_kernels.h for the op contracts and bench/KERNEL_NOTES.md for the
// byte/flop floors and timings.
#include "moe_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <type_traits>

namespace engmoe {
namespace {

// ------------------------------------------------------------------------------------------------
// small helpers
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

// N elements of T moved as one access (16 bytes when N * sizeof(T) == 16 -> LDG.128 / STG.128).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

constexpr int kBlock = 256;  // threads per block for the row kernels

// Threads per token row for a row of V vectors: enough to cover the row in few iterations without
// idling most of a wide block on short rows (tests use rows of a few vectors).
inline int threads_per_row(int64_t V) { return V >= 96 ? 128 : (V >= 48 ? 64 : 32); }

inline unsigned grid_for(int64_t work, int64_t per_block) {
  int64_t g = (work + per_block - 1) / per_block;
  if (g < 1) g = 1;
  if (g > 0x7fffffffLL) g = 0x7fffffffLL;
  return static_cast<unsigned>(g);
}

// ------------------------------------------------------------------------------------------------
// routing: stable counting sort by expert id (histogram -> scan -> ranked scatter)
// ------------------------------------------------------------------------------------------------
constexpr int kRtThreads = 256;
constexpr int kRtItems = 8;
constexpr int kRtChunk = kRtThreads * kRtItems;  // slots per block

template <typename IdxT>
__global__ void __launch_bounds__(kRtThreads) routing_hist_kernel(const IdxT* __restrict__ idx, int64_t n, int E,
                                                                  int32_t* __restrict__ block_counts, int nb) {
  extern __shared__ int32_t hist[];
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kRtChunk;
#pragma unroll
  for (int it = 0; it < kRtItems; ++it) {
    const int64_t s = base + it * kRtThreads + threadIdx.x;
    if (s < n) {
      const int64_t e = static_cast<int64_t>(idx[s]);
      if (e >= 0 && e < E) atomicAdd(&hist[e], 1);  // integer: order-independent result
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) block_counts[static_cast<int64_t>(e) * nb + blockIdx.x] = hist[e];
}

// One block: exclusive scan of the expert-major [E][nb] block counts, tokens per expert, and -1 in the
// tail of sorted_slots that dropped (out-of-range) ids leave unused.
__global__ void __launch_bounds__(1024) routing_scan_kernel(int32_t* __restrict__ bc, int E, int nb,
                                                            int64_t* __restrict__ tokens_per_expert,
                                                            int64_t* __restrict__ sorted_slots, int64_t n) {
  __shared__ int32_t sums[1024];
  __shared__ int32_t total_sh;
  const int64_t L = static_cast<int64_t>(E) * nb;
  const int64_t per = (L + blockDim.x - 1) / blockDim.x;
  const int64_t lo = threadIdx.x * per;
  const int64_t hi = lo + per < L ? lo + per : L;
  int32_t s = 0;
  for (int64_t i = lo; i < hi; ++i) s += bc[i];
  sums[threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t run = 0;
    for (int i = 0; i < static_cast<int>(blockDim.x); ++i) {
      const int32_t v = sums[i];
      sums[i] = run;
      run += v;
    }
    total_sh = run;
  }
  __syncthreads();
  int32_t run = sums[threadIdx.x];
  for (int64_t i = lo; i < hi; ++i) {
    const int32_t v = bc[i];
    bc[i] = run;
    run += v;
  }
  __syncthreads();
  const int32_t total = total_sh;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    const int32_t start = bc[static_cast<int64_t>(e) * nb];
    const int32_t end = (e + 1 < E) ? bc[static_cast<int64_t>(e + 1) * nb] : total;
    tokens_per_expert[e] = end - start;
  }
  for (int64_t i = total + threadIdx.x; i < n; i += blockDim.x) sorted_slots[i] = -1;
}

// Each block re-reads its chunk in order; a slot's rank among equal ids is found with __match_any_sync
// inside a warp plus the counts of earlier warps and rounds, so positions keep slot order (stable).
template <typename IdxT>
__global__ void __launch_bounds__(kRtThreads) routing_scatter_kernel(const IdxT* __restrict__ idx, int64_t n, int E,
                                                                     const int32_t* __restrict__ offs, int nb,
                                                                     int64_t* __restrict__ sorted_slots,
                                                                     int64_t* __restrict__ slot_to_row) {
  extern __shared__ int32_t sm[];
  constexpr int NW = kRtThreads / 32;
  int32_t* run = sm;       // [E] next free position per expert for this block
  int32_t* wcnt = sm + E;  // [NW][E] this round's count per warp and expert
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    run[e] = offs[static_cast<int64_t>(e) * nb + blockIdx.x];
#pragma unroll
    for (int w = 0; w < NW; ++w) wcnt[w * E + e] = 0;
  }
  __syncthreads();
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kRtChunk;
  const unsigned lt_mask = (1u << lane) - 1u;
  for (int it = 0; it < kRtItems; ++it) {
    const int64_t s = base + it * kRtThreads + threadIdx.x;
    int e = -1;
    if (s < n) {
      const int64_t ev = static_cast<int64_t>(idx[s]);
      if (ev >= 0 && ev < E) e = static_cast<int>(ev);
      else slot_to_row[s] = -1;  // dropped slot
    }
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int rank = __popc(peers & lt_mask);
    if (e >= 0 && rank == 0) wcnt[warp * E + e] = __popc(peers);
    __syncthreads();
    if (e >= 0) {
      int32_t pos = run[e] + rank;
      for (int w = 0; w < warp; ++w) pos += wcnt[w * E + e];
      sorted_slots[pos] = s;
      slot_to_row[s] = pos;
    }
    __syncthreads();
    for (int ee = threadIdx.x; ee < E; ee += blockDim.x) {
      int32_t add = 0;
#pragma unroll
      for (int w = 0; w < NW; ++w) {
        add += wcnt[w * E + ee];
        wcnt[w * E + ee] = 0;
      }
      run[ee] += add;
    }
    __syncthreads();
  }
}

// ------------------------------------------------------------------------------------------------
// permute / unpermute: one group of blockDim.x threads per token (blockDim.y tokens per block)
// ------------------------------------------------------------------------------------------------
template <typename T, int N, int KC>
__global__ void __launch_bounds__(kBlock) permute_kernel(const T* __restrict__ x, const int64_t* __restrict__ s2r,
                                                         T* __restrict__ out, int64_t ntok, int k, int64_t V) {
  using VT = Vec<T, N>;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (t >= ntok) return;
  const VT* __restrict__ src = reinterpret_cast<const VT*>(x) + t * V;
  VT* __restrict__ dst = reinterpret_cast<VT*>(out);
  for (int j0 = 0; j0 < k; j0 += KC) {
    int64_t rows[KC];
#pragma unroll
    for (int jj = 0; jj < KC; ++jj) rows[jj] = (j0 + jj < k) ? s2r[t * k + j0 + jj] : -1;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
      const VT a = src[v];
#pragma unroll
      for (int jj = 0; jj < KC; ++jj)
        if (rows[jj] >= 0) dst[rows[jj] * V + v] = a;
    }
  }
}

template <typename T, int N, int KC>
__global__ void __launch_bounds__(kBlock) unpermute_kernel(const T* __restrict__ y, const int64_t* __restrict__ s2r,
                                                         const float* __restrict__ probs, T* __restrict__ out,
                                                         int64_t ntok, int k, int64_t V) {
  using VT = Vec<T, N>;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (t >= ntok) return;
  const VT* __restrict__ src = reinterpret_cast<const VT*>(y);
  VT* __restrict__ dst = reinterpret_cast<VT*>(out) + t * V;
  if (k <= KC) {  // every row of the token in registers: KC independent 16-byte loads in flight
    int64_t rows[KC];
    float p[KC];
#pragma unroll
    for (int jj = 0; jj < KC; ++jj) {
      rows[jj] = (jj < k) ? s2r[t * k + jj] : -1;
      p[jj] = (jj < k && probs != nullptr) ? probs[t * k + jj] : 1.0f;
    }
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
      VT a[KC];
#pragma unroll
      for (int jj = 0; jj < KC; ++jj)
        if (rows[jj] >= 0) a[jj] = src[rows[jj] * V + v];
      float acc[N];
#pragma unroll
      for (int n = 0; n < N; ++n) acc[n] = 0.0f;
#pragma unroll
      for (int jj = 0; jj < KC; ++jj)
        if (rows[jj] >= 0) {
#pragma unroll
          for (int n = 0; n < N; ++n) acc[n] = fmaf(p[jj], to_f(a[jj].v[n]), acc[n]);
        }
      VT o;
#pragma unroll
      for (int n = 0; n < N; ++n) o.v[n] = from_f<T>(acc[n]);
      dst[v] = o;
    }
  } else {  // k > KC: chunks of KC rows, same summation order (j ascending)
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
      float acc[N];
#pragma unroll
      for (int n = 0; n < N; ++n) acc[n] = 0.0f;
      for (int j0 = 0; j0 < k; j0 += KC) {
        VT a[KC];
        int64_t rows[KC];
        float p[KC];
#pragma unroll
        for (int jj = 0; jj < KC; ++jj) {
          rows[jj] = (j0 + jj < k) ? s2r[t * k + j0 + jj] : -1;
          p[jj] = (j0 + jj < k && probs != nullptr) ? probs[t * k + j0 + jj] : 1.0f;
          if (rows[jj] >= 0) a[jj] = src[rows[jj] * V + v];
        }
#pragma unroll
        for (int jj = 0; jj < KC; ++jj)
          if (rows[jj] >= 0) {
#pragma unroll
            for (int n = 0; n < N; ++n) acc[n] = fmaf(p[jj], to_f(a[jj].v[n]), acc[n]);
          }
      }
      VT o;
#pragma unroll
      for (int n = 0; n < N; ++n) o.v[n] = from_f<T>(acc[n]);
      dst[v] = o;
    }
  }
}

// grad_y rows are scattered from g[t] (read once per chunk of KC slots); the probability gradient is a
// per-(token, slot) dot product reduced warp-then-block in a fixed order.
template <typename T, int N, int KC>
__global__ void __launch_bounds__(kBlock) unpermute_bwd_kernel(const T* __restrict__ g, const T* __restrict__ y,
                                                             const int64_t* __restrict__ s2r,
                                                             const float* __restrict__ probs, T* __restrict__ gy,
                                                             float* __restrict__ gp, int64_t ntok, int k, int64_t V) {
  using VT = Vec<T, N>;
  __shared__ float red[kBlock / 32][KC];
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = t < ntok;
  const bool need_dot = gp != nullptr;
  const int lane = threadIdx.x & 31;
  const int warps_per_row = blockDim.x >> 5;
  const int warp = threadIdx.y * warps_per_row + (threadIdx.x >> 5);
  const VT* __restrict__ gsrc = reinterpret_cast<const VT*>(g) + (valid ? t : 0) * V;
  const VT* __restrict__ ysrc = reinterpret_cast<const VT*>(y);
  VT* __restrict__ dst = reinterpret_cast<VT*>(gy);
  for (int j0 = 0; j0 < k; j0 += KC) {
    int64_t rows[KC];
    float p[KC], dot[KC];
#pragma unroll
    for (int jj = 0; jj < KC; ++jj) {
      rows[jj] = (valid && j0 + jj < k) ? s2r[t * k + j0 + jj] : -1;
      p[jj] = (valid && j0 + jj < k && probs != nullptr) ? probs[t * k + j0 + jj] : 1.0f;
      dot[jj] = 0.0f;
    }
    if (valid) {
      for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
        const VT gv = gsrc[v];
        float gf[N];
#pragma unroll
        for (int n = 0; n < N; ++n) gf[n] = to_f(gv.v[n]);
        VT a[KC];
        if (need_dot) {
#pragma unroll
          for (int jj = 0; jj < KC; ++jj)
            if (rows[jj] >= 0) a[jj] = ysrc[rows[jj] * V + v];
        }
#pragma unroll
        for (int jj = 0; jj < KC; ++jj) {
          if (rows[jj] < 0) continue;
          if (probs != nullptr) {
            VT o;
#pragma unroll
            for (int n = 0; n < N; ++n) o.v[n] = from_f<T>(p[jj] * gf[n]);
            dst[rows[jj] * V + v] = o;
          } else {
            dst[rows[jj] * V + v] = gv;
          }
          if (need_dot) {
#pragma unroll
            for (int n = 0; n < N; ++n) dot[jj] = fmaf(gf[n], to_f(a[jj].v[n]), dot[jj]);
          }
        }
      }
    }
    if (need_dot) {  // uniform over the block
#pragma unroll
      for (int jj = 0; jj < KC; ++jj) dot[jj] = warp_sum(dot[jj]);
      if (lane == 0) {
#pragma unroll
        for (int jj = 0; jj < KC; ++jj) red[warp][jj] = dot[jj];
      }
      __syncthreads();
      if (valid && threadIdx.x == 0) {
#pragma unroll
        for (int jj = 0; jj < KC; ++jj) {
          if (j0 + jj >= k) break;
          float s = 0.0f;
          for (int w = 0; w < warps_per_row; ++w) s += red[threadIdx.y * warps_per_row + w][jj];
          gp[t * k + j0 + jj] = s;
        }
      }
      __syncthreads();
    }
  }
}

// ------------------------------------------------------------------------------------------------
// SwiGLU (+ per-row scale, e.g. the routing probability of the row)
// ------------------------------------------------------------------------------------------------
template <typename T, int N>
__global__ void __launch_bounds__(kBlock) swiglu_kernel(const T* __restrict__ h, const float* __restrict__ scale,
                                                        T* __restrict__ out, int64_t rows, int64_t Vf) {
  using VT = Vec<T, N>;
  const int64_t total = rows * Vf;
  const VT* __restrict__ hv = reinterpret_cast<const VT*>(h);
  VT* __restrict__ ov = reinterpret_cast<VT*>(out);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / Vf;
    const int64_t c = i - r * Vf;
    const VT gv = hv[r * 2 * Vf + c];
    const VT uv = hv[r * 2 * Vf + Vf + c];
    const float s = scale != nullptr ? scale[r] : 1.0f;
    VT o;
#pragma unroll
    for (int n = 0; n < N; ++n) {
      const float gf = to_f(gv.v[n]);
      o.v[n] = from_f<T>(gf * sigmoidf_(gf) * to_f(uv.v[n]) * s);
    }
    ov[i] = o;
  }
}

// One warp per row (grid-stride): the scale gradient is a dot product over the row.
template <typename T, int N>
__global__ void __launch_bounds__(kBlock) swiglu_bwd_kernel(const T* __restrict__ go, const T* __restrict__ h,
                                                            const float* __restrict__ scale, T* __restrict__ gh,
                                                            float* __restrict__ gscale, int64_t rows, int64_t Vf) {
  using VT = Vec<T, N>;
  const int lane = threadIdx.x & 31;
  const int64_t wg = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nw = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const VT* __restrict__ hv = reinterpret_cast<const VT*>(h);
  const VT* __restrict__ gov = reinterpret_cast<const VT*>(go);
  VT* __restrict__ ghv = reinterpret_cast<VT*>(gh);
  for (int64_t r = wg; r < rows; r += nw) {
    const float s = scale != nullptr ? scale[r] : 1.0f;
    float dot = 0.0f;
    for (int64_t c = lane; c < Vf; c += 32) {
      const VT gv = hv[r * 2 * Vf + c];
      const VT uv = hv[r * 2 * Vf + Vf + c];
      const VT o = gov[r * Vf + c];
      VT dg, du;
#pragma unroll
      for (int n = 0; n < N; ++n) {
        const float gf = to_f(gv.v[n]), uf = to_f(uv.v[n]), of = to_f(o.v[n]);
        const float sg = sigmoidf_(gf);
        const float silu = gf * sg;
        dot = fmaf(of, silu * uf, dot);
        const float os = of * s;
        dg.v[n] = from_f<T>(os * uf * sg * (1.0f + gf * (1.0f - sg)));
        du.v[n] = from_f<T>(os * silu);
      }
      ghv[r * 2 * Vf + c] = dg;
      ghv[r * 2 * Vf + Vf + c] = du;
    }
    if (gscale != nullptr) {
      dot = warp_sum(dot);
      if (lane == 0) gscale[r] = dot;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// router: softmax + top-k (+ renormalisation), one warp per token, EPL experts per lane
// ------------------------------------------------------------------------------------------------
template <int EPL>
__global__ void __launch_bounds__(kBlock) router_topk_kernel(const float* __restrict__ logits,
                                                              float* __restrict__ probs, float* __restrict__ tp,
                                                              int64_t* __restrict__ ti, int64_t T, int E, int k,
                                                              bool renorm) {
  const int lane = threadIdx.x & 31;
  const int64_t wg = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nw = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t t = wg; t < T; t += nw) {
    float v[EPL];
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const int e = lane + 32 * i;
      v[i] = e < E ? logits[t * E + e] : -INFINITY;
      mx = fmaxf(mx, v[i]);
    }
    mx = warp_max(mx);
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const int e = lane + 32 * i;
      v[i] = e < E ? expf(v[i] - mx) : 0.0f;
      sum += v[i];
    }
    sum = warp_sum(sum);
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const int e = lane + 32 * i;
      if (e < E) {
        v[i] = v[i] / sum;
        probs[t * E + e] = v[i];
      } else {
        v[i] = -1.0f;  // below every probability: never selected
      }
    }
    unsigned taken = 0;
    float selsum = 0.0f;
    for (int r = 0; r < k; ++r) {
      float bv = -2.0f;
      int be = INT_MAX;
#pragma unroll
      for (int i = 0; i < EPL; ++i) {
        if (!((taken >> i) & 1u) && v[i] > bv) {
          bv = v[i];
          be = lane + 32 * i;
        }
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
        const int oe = __shfl_xor_sync(0xffffffffu, be, off);
        if (ov > bv || (ov == bv && oe < be)) {
          bv = ov;
          be = oe;
        }
      }
      if ((be & 31) == lane) taken |= 1u << (be >> 5);
      if (lane == 0) {
        tp[t * k + r] = bv;
        ti[t * k + r] = be;
      }
      selsum += bv;
    }
    if (renorm) {
      __syncwarp();
      for (int r = lane; r < k; r += 32) tp[t * k + r] = tp[t * k + r] / selsum;
    }
  }
}

template <int EPL>
__global__ void __launch_bounds__(kBlock) router_topk_bwd_kernel(
    const float* __restrict__ gprobs, const float* __restrict__ gtopk, const float* __restrict__ probs,
    const float* __restrict__ tp, const int64_t* __restrict__ ti, float* __restrict__ glogits, int64_t T, int E, int k,
    bool renorm) {
  const int lane = threadIdx.x & 31;
  const int64_t wg = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nw = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t t = wg; t < T; t += nw) {
    float P[EPL], dP[EPL];
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const int e = lane + 32 * i;
      P[i] = e < E ? probs[t * E + e] : 0.0f;
      dP[i] = (e < E && gprobs != nullptr) ? gprobs[t * E + e] : 0.0f;
    }
    if (gtopk != nullptr) {
      float s = 1.0f, dot = 0.0f;
      if (renorm) {
        float ps = 0.0f;
        for (int j = lane; j < k; j += 32) {
          ps += probs[t * E + ti[t * k + j]];
          dot = fmaf(gtopk[t * k + j], tp[t * k + j], dot);
        }
        s = warp_sum(ps);
        dot = warp_sum(dot);
      }
      for (int j = 0; j < k; ++j) {
        const int e = static_cast<int>(ti[t * k + j]);
        if ((e & 31) != lane) continue;
        const float d = renorm ? (gtopk[t * k + j] - dot) / s : gtopk[t * k + j];
#pragma unroll
        for (int i = 0; i < EPL; ++i)
          if ((e >> 5) == i) dP[i] += d;
      }
    }
    float pd = 0.0f;
#pragma unroll
    for (int i = 0; i < EPL; ++i) pd = fmaf(P[i], dP[i], pd);
    pd = warp_sum(pd);
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const int e = lane + 32 * i;
      if (e < E) glogits[t * E + e] = P[i] * (dP[i] - pd);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// cross-entropy: one block per logits row; online (max, sum-exp) in fp32, one read of the row
// ------------------------------------------------------------------------------------------------
constexpr int kCeBlock = 512;

// merge two (max, sum of exp(x - max)) pairs
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;  // both empty
  s = s * expf(m - mn) + s2 * expf(m2 - mn);
  m = mn;
}

template <typename T, int N>
__global__ void __launch_bounds__(kCeBlock) cross_entropy_stats_kernel(const T* __restrict__ x, const int64_t* __restrict__ target,
                                                            float* __restrict__ row_max, float* __restrict__ row_sumexp,
                                                            float* __restrict__ row_target, int64_t Vv, int64_t V,
                                                            int64_t vocab_start) {
  using VT = Vec<T, N>;
  const int64_t r = blockIdx.x;
  const VT* __restrict__ xv = reinterpret_cast<const VT*>(x + r * V);
  float m = -INFINITY, s = 0.0f;
  for (int64_t c = threadIdx.x; c < Vv; c += blockDim.x) {
    const VT v = xv[c];
    float f[N];
    float vmax = -INFINITY;
#pragma unroll
    for (int n = 0; n < N; ++n) {
      f[n] = to_f(v.v[n]);
      vmax = fmaxf(vmax, f[n]);
    }
    const float mn = fmaxf(m, vmax);
    if (mn == -INFINITY) continue;
    float acc = s * expf(m - mn);
#pragma unroll
    for (int n = 0; n < N; ++n) acc += expf(f[n] - mn);
    m = mn;
    s = acc;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, off), s2 = __shfl_xor_sync(0xffffffffu, s, off);
    lse_merge(m, s, m2, s2);
  }
  __shared__ float sm[kCeBlock / 32], ss[kCeBlock / 32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) {
    sm[warp] = m;
    ss[warp] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float bm = sm[0], bs = ss[0];
    for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) lse_merge(bm, bs, sm[w], ss[w]);
    row_max[r] = bm;
    row_sumexp[r] = bs;
    const int64_t t = target[r] - vocab_start;
    row_target[r] = (t >= 0 && t < V) ? to_f(x[r * V + t]) : 0.0f;
  }
}

// gx may alias x (in-place backward): each element is read, then written, by the same thread
template <typename T, int N>
__global__ void __launch_bounds__(kCeBlock) cross_entropy_backward_kernel(const T* x, const int64_t* __restrict__ target,
                                                          const float* __restrict__ row_max,
                                                          const float* __restrict__ inv_sumexp,
                                                          const float* __restrict__ grad, T* gx, int64_t Vv,
                                                          int64_t V, int64_t vocab_start) {
  using VT = Vec<T, N>;
  const int64_t r = blockIdx.x;
  const VT* xv = reinterpret_cast<const VT*>(x + r * V);
  VT* gv = reinterpret_cast<VT*>(gx + r * V);
  const float m = row_max[r], inv = inv_sumexp[r], g = grad[r];
  const int64_t t = target[r] - vocab_start;
  for (int64_t c = threadIdx.x; c < Vv; c += blockDim.x) {
    const VT v = xv[c];
    VT o;
#pragma unroll
    for (int n = 0; n < N; ++n) {
      const float p = expf(to_f(v.v[n]) - m) * inv;
      o.v[n] = from_f<T>((p - (c * N + n == t ? 1.0f : 0.0f)) * g);
    }
    gv[c] = o;
  }
}

// ------------------------------------------------------------------------------------------------
// dispatch helpers
// ------------------------------------------------------------------------------------------------
template <typename F>
cudaError_t with_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::F32: return f(float{});
    case DType::BF16: return f(__nv_bfloat16{});
    case DType::F16: return f(__half{});
  }
  return cudaErrorInvalidValue;
}

template <int KC, typename F>
cudaError_t with_kc_impl(F&& f) { return f(std::integral_constant<int, KC>{}); }

template <typename F>
cudaError_t with_kc(int k, F&& f) {
  if (k <= 1) return with_kc_impl<1>(f);
  if (k <= 2) return with_kc_impl<2>(f);
  if (k <= 4) return with_kc_impl<4>(f);
  return with_kc_impl<8>(f);
}

template <typename T>
constexpr int vec_n() { return static_cast<int>(16 / sizeof(T)); }

}  // namespace

// ================================================================================================
// launchers
// ================================================================================================
int64_t routing_workspace_elems(int64_t n, int num_experts) {
  const int64_t nb = (n + kRtChunk - 1) / kRtChunk;
  return nb * num_experts;
}

cudaError_t launch_routing_maps(const void* idx, bool idx_int64, int64_t n, int E, int64_t* sorted_slots,
                                int64_t* slot_to_row, int64_t* tokens_per_expert, int32_t* workspace,
                                cudaStream_t stream) {
  if (E < 1 || E > kMaxRoutingExperts) return cudaErrorInvalidValue;
  if (n == 0) return cudaMemsetAsync(tokens_per_expert, 0, sizeof(int64_t) * E, stream);
  const int nb = static_cast<int>((n + kRtChunk - 1) / kRtChunk);
  const size_t hist_smem = sizeof(int32_t) * E;
  const size_t scat_smem = sizeof(int32_t) * E * (1 + kRtThreads / 32);
  if (idx_int64) {
    routing_hist_kernel<int64_t><<<nb, kRtThreads, hist_smem, stream>>>(static_cast<const int64_t*>(idx), n, E,
                                                                          workspace, nb);
  } else {
    routing_hist_kernel<int32_t><<<nb, kRtThreads, hist_smem, stream>>>(static_cast<const int32_t*>(idx), n, E,
                                                                          workspace, nb);
  }
  routing_scan_kernel<<<1, 1024, 0, stream>>>(workspace, E, nb, tokens_per_expert, sorted_slots, n);
  if (idx_int64) {
    routing_scatter_kernel<int64_t><<<nb, kRtThreads, scat_smem, stream>>>(
        static_cast<const int64_t*>(idx), n, E, workspace, nb, sorted_slots, slot_to_row);
  } else {
    routing_scatter_kernel<int32_t><<<nb, kRtThreads, scat_smem, stream>>>(
        static_cast<const int32_t*>(idx), n, E, workspace, nb, sorted_slots, slot_to_row);
  }
  return cudaGetLastError();
}

cudaError_t launch_permute(DType dt, const void* x, const int64_t* s2r, void* out, int64_t T, int k, int64_t H,
                           bool vec_ok, cudaStream_t stream) {
  if (T == 0 || H == 0 || k == 0) return cudaSuccess;
  return with_dtype(dt, [&](auto tag) {
    using Ty = decltype(tag);
    return with_kc(k, [&](auto kc) {
      constexpr int KC = decltype(kc)::value;
      constexpr int NV = vec_n<Ty>();
      const int64_t V = vec_ok ? H / NV : H;
      const int tpr = threads_per_row(V);
      dim3 block(tpr, kBlock / tpr);
      const unsigned grid = grid_for(T, block.y);
      if (vec_ok)
        permute_kernel<Ty, NV, KC><<<grid, block, 0, stream>>>(static_cast<const Ty*>(x), s2r, static_cast<Ty*>(out),
                                                               T, k, V);
      else
        permute_kernel<Ty, 1, KC><<<grid, block, 0, stream>>>(static_cast<const Ty*>(x), s2r, static_cast<Ty*>(out),
                                                              T, k, V);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_unpermute(DType dt, const void* y, const int64_t* s2r, const float* probs, void* out, int64_t T,
                           int k, int64_t H, bool vec_ok, cudaStream_t stream) {
  if (T == 0 || H == 0) return cudaSuccess;
  if (k == 0) return cudaSuccess;  // the caller zero-fills out
  return with_dtype(dt, [&](auto tag) {
    using Ty = decltype(tag);
    return with_kc(k, [&](auto kc) {
      constexpr int KC = decltype(kc)::value;
      constexpr int NV = vec_n<Ty>();
      const int64_t V = vec_ok ? H / NV : H;
      const int tpr = threads_per_row(V);
      dim3 block(tpr, kBlock / tpr);
      const unsigned grid = grid_for(T, block.y);
      if (vec_ok)
        unpermute_kernel<Ty, NV, KC><<<grid, block, 0, stream>>>(static_cast<const Ty*>(y), s2r, probs,
                                                               static_cast<Ty*>(out), T, k, V);
      else
        unpermute_kernel<Ty, 1, KC><<<grid, block, 0, stream>>>(static_cast<const Ty*>(y), s2r, probs,
                                                              static_cast<Ty*>(out), T, k, V);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_unpermute_bwd(DType dt, const void* g, const void* y, const int64_t* s2r, const float* probs,
                               void* grad_y, float* grad_probs, int64_t T, int k, int64_t H, bool vec_ok,
                               cudaStream_t stream) {
  if (T == 0 || k == 0) return cudaSuccess;
  if (H == 0) {
    if (grad_probs != nullptr) return cudaMemsetAsync(grad_probs, 0, sizeof(float) * T * k, stream);
    return cudaSuccess;
  }
  return with_dtype(dt, [&](auto tag) {
    using Ty = decltype(tag);
    return with_kc(k, [&](auto kc) {
      constexpr int KC = decltype(kc)::value;
      constexpr int NV = vec_n<Ty>();
      const int64_t V = vec_ok ? H / NV : H;
      const int tpr = threads_per_row(V);
      dim3 block(tpr, kBlock / tpr);
      const unsigned grid = grid_for(T, block.y);
      if (vec_ok)
        unpermute_bwd_kernel<Ty, NV, KC><<<grid, block, 0, stream>>>(static_cast<const Ty*>(g),
                                                                   static_cast<const Ty*>(y), s2r, probs,
                                                                   static_cast<Ty*>(grad_y), grad_probs, T, k, V);
      else
        unpermute_bwd_kernel<Ty, 1, KC><<<grid, block, 0, stream>>>(static_cast<const Ty*>(g),
                                                                  static_cast<const Ty*>(y), s2r, probs,
                                                                  static_cast<Ty*>(grad_y), grad_probs, T, k, V);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_swiglu(DType dt, const void* h, const float* scale, void* out, int64_t N, int64_t F, bool vec_ok,
                          cudaStream_t stream) {
  if (N == 0 || F == 0) return cudaSuccess;
  return with_dtype(dt, [&](auto tag) {
    using Ty = decltype(tag);
    constexpr int NV = vec_n<Ty>();
    const int64_t Vf = vec_ok ? F / NV : F;
    const int64_t total = N * Vf;
    const unsigned grid = grid_for(total, kBlock);
    if (vec_ok)
      swiglu_kernel<Ty, NV><<<grid, kBlock, 0, stream>>>(static_cast<const Ty*>(h), scale, static_cast<Ty*>(out), N,
                                                         Vf);
    else
      swiglu_kernel<Ty, 1><<<grid, kBlock, 0, stream>>>(static_cast<const Ty*>(h), scale, static_cast<Ty*>(out), N,
                                                        Vf);
    return cudaGetLastError();
  });
}

cudaError_t launch_swiglu_bwd(DType dt, const void* grad_out, const void* h, const float* scale, void* grad_h,
                              float* grad_scale, int64_t N, int64_t F, bool vec_ok, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (F == 0) {
    if (grad_scale != nullptr) return cudaMemsetAsync(grad_scale, 0, sizeof(float) * N, stream);
    return cudaSuccess;
  }
  return with_dtype(dt, [&](auto tag) {
    using Ty = decltype(tag);
    constexpr int NV = vec_n<Ty>();
    const int64_t Vf = vec_ok ? F / NV : F;
    const unsigned grid = grid_for(N, kBlock / 32);
    if (vec_ok)
      swiglu_bwd_kernel<Ty, NV><<<grid, kBlock, 0, stream>>>(static_cast<const Ty*>(grad_out),
                                                             static_cast<const Ty*>(h), scale,
                                                             static_cast<Ty*>(grad_h), grad_scale, N, Vf);
    else
      swiglu_bwd_kernel<Ty, 1><<<grid, kBlock, 0, stream>>>(static_cast<const Ty*>(grad_out),
                                                            static_cast<const Ty*>(h), scale, static_cast<Ty*>(grad_h),
                                                            grad_scale, N, Vf);
    return cudaGetLastError();
  });
}

template <typename F>
static cudaError_t with_epl(int E, F&& f) {
  if (E <= 32) return f(std::integral_constant<int, 1>{});
  if (E <= 64) return f(std::integral_constant<int, 2>{});
  if (E <= 128) return f(std::integral_constant<int, 4>{});
  if (E <= 256) return f(std::integral_constant<int, 8>{});
  return cudaErrorInvalidValue;
}

cudaError_t launch_router_topk(const float* logits, float* probs, float* topk_probs, int64_t* topk_idx, int64_t T,
                                int E, int k, bool renorm, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  if (k < 1 || k > E) return cudaErrorInvalidValue;
  return with_epl(E, [&](auto epl) {
    constexpr int EPL = decltype(epl)::value;
    const unsigned grid = grid_for(T, kBlock / 32);
    router_topk_kernel<EPL><<<grid, kBlock, 0, stream>>>(logits, probs, topk_probs, topk_idx, T, E, k, renorm);
    return cudaGetLastError();
  });
}

cudaError_t launch_router_topk_bwd(const float* grad_probs, const float* grad_topk, const float* probs,
                                    const float* topk_probs, const int64_t* topk_idx, float* grad_logits, int64_t T,
                                    int E, int k, bool renorm, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  return with_epl(E, [&](auto epl) {
    constexpr int EPL = decltype(epl)::value;
    const unsigned grid = grid_for(T, kBlock / 32);
    router_topk_bwd_kernel<EPL><<<grid, kBlock, 0, stream>>>(grad_probs, grad_topk, probs, topk_probs, topk_idx,
                                                              grad_logits, T, E, k, renorm);
    return cudaGetLastError();
  });
}

cudaError_t launch_cross_entropy_stats(DType dt, const void* logits, const int64_t* target, float* row_max, float* row_sumexp,
                            float* row_target, int64_t N, int64_t V, int64_t vocab_start, bool vec_ok,
                            cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (N > 0x7fffffffLL) return cudaErrorInvalidValue;
  return with_dtype(dt, [&](auto tag) {
    using Ty = decltype(tag);
    constexpr int NV = vec_n<Ty>();
    const unsigned grid = static_cast<unsigned>(N);
    if (vec_ok)
      cross_entropy_stats_kernel<Ty, NV><<<grid, kCeBlock, 0, stream>>>(static_cast<const Ty*>(logits), target, row_max,
                                                             row_sumexp, row_target, V / NV, V, vocab_start);
    else
      cross_entropy_stats_kernel<Ty, 1><<<grid, kCeBlock, 0, stream>>>(static_cast<const Ty*>(logits), target, row_max,
                                                            row_sumexp, row_target, V, V, vocab_start);
    return cudaGetLastError();
  });
}

cudaError_t launch_cross_entropy_backward(DType dt, const void* logits, const int64_t* target, const float* row_max,
                          const float* inv_sumexp, const float* grad, void* grad_logits, int64_t N, int64_t V,
                          int64_t vocab_start, bool vec_ok, cudaStream_t stream) {
  if (N == 0 || V == 0) return cudaSuccess;
  if (N > 0x7fffffffLL) return cudaErrorInvalidValue;
  return with_dtype(dt, [&](auto tag) {
    using Ty = decltype(tag);
    constexpr int NV = vec_n<Ty>();
    const unsigned grid = static_cast<unsigned>(N);
    if (vec_ok)
      cross_entropy_backward_kernel<Ty, NV><<<grid, kCeBlock, 0, stream>>>(static_cast<const Ty*>(logits), target, row_max,
                                                           inv_sumexp, grad, static_cast<Ty*>(grad_logits), V / NV,
                                                           V, vocab_start);
    else
      cross_entropy_backward_kernel<Ty, 1><<<grid, kCeBlock, 0, stream>>>(static_cast<const Ty*>(logits), target, row_max,
                                                          inv_sumexp, grad, static_cast<Ty*>(grad_logits), V, V,
                                                          vocab_start);
    return cudaGetLastError();
  });
}

}  // namespace engmoe
