// Experts' weight gradient accumulated into fp32 main_grad (gradient-accumulation fusion, engmoe/kernels/wgrad.py):
//   main_grad[e] += x_eᵀ · dy_e   for the row blocks of expert-sorted x [T, K], dy [T, N] (bf16/fp16)
// One cuBLAS GEMM per non-empty expert with fp32 output and beta = 1 (ATen's addmm.dtype_out, the same call
// the Python loop makes), issued from C++ so the per-expert host cost is the dispatcher's, not Python's.
// The row counts come as an int64 CPU tensor (prefetched to pinned memory during the forward).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

namespace engmoe {
namespace {

void grouped_wgrad_accum_(at::Tensor main_grad, const at::Tensor& x, const at::Tensor& dy, const at::Tensor& rows) {
  TORCH_CHECK(main_grad.is_cuda() && x.is_cuda() && dy.is_cuda(), "engmoe::grouped_wgrad_accum_: CUDA tensors expected");
  TORCH_CHECK(main_grad.scalar_type() == at::kFloat && main_grad.dim() == 3 && main_grad.is_contiguous(),
              "engmoe::grouped_wgrad_accum_: main_grad must be a contiguous float32 [E, K, N] tensor");
  TORCH_CHECK(x.dim() == 2 && dy.dim() == 2 && x.size(0) == dy.size(0), "engmoe::grouped_wgrad_accum_: x [T, K], dy [T, N]");
  TORCH_CHECK(x.scalar_type() == dy.scalar_type() &&
                  (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf),
              "engmoe::grouped_wgrad_accum_: x and dy must both be bfloat16 or both float16");
  TORCH_CHECK(x.size(1) == main_grad.size(1) && dy.size(1) == main_grad.size(2),
              "engmoe::grouped_wgrad_accum_: x/dy widths do not match main_grad [E, K, N]");
  TORCH_CHECK(!rows.is_cuda() && rows.scalar_type() == at::kLong && rows.dim() == 1 && rows.numel() == main_grad.size(0),
              "engmoe::grouped_wgrad_accum_: rows must be an int64 CPU tensor with one count per expert");
  const at::Tensor counts = rows.contiguous();
  const int64_t* n = counts.data_ptr<int64_t>();
  int64_t start = 0;
  for (int64_t e = 0; e < counts.numel(); ++e) {
    TORCH_CHECK(n[e] >= 0 && start + n[e] <= x.size(0), "engmoe::grouped_wgrad_accum_: row counts exceed x's rows");
    if (n[e] > 0) {
      at::Tensor c = main_grad.select(0, e);
      at::addmm_out(c, c, x.narrow(0, start, n[e]).t(), dy.narrow(0, start, n[e]), at::kFloat);
    }
    start += n[e];
  }
  TORCH_CHECK(start == x.size(0), "engmoe::grouped_wgrad_accum_: row counts sum to ", start, ", x has ", x.size(0));
}

}  // namespace
}  // namespace engmoe

TORCH_LIBRARY_FRAGMENT(engmoe, m) {
  m.def("grouped_wgrad_accum_(Tensor(a!) main_grad, Tensor x, Tensor dy, Tensor rows) -> ()");
}

TORCH_LIBRARY_IMPL(engmoe, CUDA, m) {
  m.impl("grouped_wgrad_accum_", &engmoe::grouped_wgrad_accum_);
}
