// Torch bindings of the engmoe kernels: schemas in the `engmoe` namespace (TORCH_LIBRARY), CUDA
// implementations here, fake (meta) implementations and autograd formulas in engmoe/kernels/cuda_ops.py.
// Loaded either as the Python extension module engmoe._C (setup.py) or with torch.ops.load_library /
// torch.utils.cpp_extension.load (the JIT path); the op registrations run when the library is loaded.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "moe_kernels.h"

namespace engmoe {
namespace {

DType to_dtype(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default: TORCH_CHECK(false, "engmoe::", op, ": unsupported dtype ", t.scalar_type(), " (float32/bfloat16/float16)");
  }
  return DType::F32;
}

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "engmoe::", op, ": ", name, " must be a CUDA tensor");
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "engmoe::", op, ": CUDA error: ", cudaGetErrorString(err));
}

bool aligned16(const at::Tensor& t) { return !t.defined() || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// 16-byte vectors are used when a row is a whole number of vectors and every base pointer is aligned.
bool vec_ok(int64_t row_elems, int64_t esize, std::initializer_list<at::Tensor> ts) {
  if ((row_elems * esize) % 16 != 0) return false;
  for (const auto& t : ts)
    if (!aligned16(t)) return false;
  return true;
}

at::Tensor index_tensor(const at::Tensor& t, const char* op, const char* name) {
  check_cuda(t, op, name);
  TORCH_CHECK(t.scalar_type() == at::kLong, "engmoe::", op, ": ", name, " must be int64");
  return t.contiguous();
}

std::optional<at::Tensor> probs_f32(const std::optional<at::Tensor>& p, int64_t n, const char* op) {
  if (!p.has_value() || !p->defined()) return std::nullopt;
  check_cuda(*p, op, "probs");
  TORCH_CHECK(p->numel() == n, "engmoe::", op, ": probs has ", p->numel(), " elements, expected ", n);
  return p->to(at::kFloat).contiguous();
}

const float* fptr(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

// ------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_maps(const at::Tensor& topk_idx, int64_t num_experts) {
  check_cuda(topk_idx, "routing_maps", "topk_idx");
  TORCH_CHECK(topk_idx.scalar_type() == at::kLong || topk_idx.scalar_type() == at::kInt,
              "engmoe::routing_maps: topk_idx must be int64 or int32");
  TORCH_CHECK(num_experts >= 1 && num_experts <= kMaxRoutingExperts, "engmoe::routing_maps: num_experts must be in [1, ",
              kMaxRoutingExperts, "], got ", num_experts);
  c10::cuda::CUDAGuard guard(topk_idx.device());
  const auto idx = topk_idx.contiguous();
  const int64_t n = idx.numel();
  TORCH_CHECK(n < (int64_t{1} << 31), "engmoe::routing_maps: too many slots (", n, ")");
  const auto lopts = idx.options().dtype(at::kLong);
  auto sorted_slots = at::empty({n}, lopts);
  auto slot_to_row = at::empty({n}, lopts);
  auto tokens_per_expert = at::empty({num_experts}, lopts);
  auto ws = at::empty({std::max<int64_t>(1, routing_workspace_elems(n, static_cast<int>(num_experts)))},
                      idx.options().dtype(at::kInt));
  check_launch(launch_routing_maps(idx.data_ptr(), idx.scalar_type() == at::kLong, n, static_cast<int>(num_experts),
                                   sorted_slots.data_ptr<int64_t>(), slot_to_row.data_ptr<int64_t>(),
                                   tokens_per_expert.data_ptr<int64_t>(), ws.data_ptr<int32_t>(),
                                   c10::cuda::getCurrentCUDAStream()),
               "routing_maps");
  return {sorted_slots, slot_to_row, tokens_per_expert};
}

at::Tensor permute(const at::Tensor& x, const at::Tensor& slot_to_row, int64_t top_k, int64_t num_rows) {
  check_cuda(x, "permute", "x");
  TORCH_CHECK(x.dim() == 2, "engmoe::permute: x must be [T, H]");
  TORCH_CHECK(top_k >= 1, "engmoe::permute: top_k must be >= 1");
  c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous();
  const auto s2r = index_tensor(slot_to_row, "permute", "slot_to_row");
  const int64_t T = xc.size(0), H = xc.size(1);
  TORCH_CHECK(s2r.numel() == T * top_k, "engmoe::permute: slot_to_row has ", s2r.numel(), " entries, expected ", T * top_k);
  auto out = at::empty({num_rows, H}, xc.options());
  const bool v = vec_ok(H, xc.element_size(), {xc, out});
  check_launch(launch_permute(to_dtype(xc, "permute"), xc.data_ptr(), s2r.data_ptr<int64_t>(), out.data_ptr(), T,
                              static_cast<int>(top_k), H, v, c10::cuda::getCurrentCUDAStream()),
               "permute");
  return out;
}

at::Tensor unpermute(const at::Tensor& y, const at::Tensor& slot_to_row, const std::optional<at::Tensor>& probs,
                   int64_t top_k) {
  check_cuda(y, "unpermute", "y");
  TORCH_CHECK(y.dim() == 2, "engmoe::unpermute: y must be [rows, H]");
  TORCH_CHECK(top_k >= 1, "engmoe::unpermute: top_k must be >= 1");
  c10::cuda::CUDAGuard guard(y.device());
  const auto yc = y.contiguous();
  const auto s2r = index_tensor(slot_to_row, "unpermute", "slot_to_row");
  TORCH_CHECK(s2r.numel() % top_k == 0, "engmoe::unpermute: slot_to_row size is not a multiple of top_k");
  const int64_t T = s2r.numel() / top_k, H = yc.size(1);
  const auto p = probs_f32(probs, T * top_k, "unpermute");
  auto out = at::empty({T, H}, yc.options());
  const bool v = vec_ok(H, yc.element_size(), {yc, out});
  check_launch(launch_unpermute(to_dtype(yc, "unpermute"), yc.data_ptr(), s2r.data_ptr<int64_t>(), fptr(p), out.data_ptr(),
                              T, static_cast<int>(top_k), H, v, c10::cuda::getCurrentCUDAStream()),
               "unpermute");
  return out;
}

std::tuple<at::Tensor, at::Tensor> unpermute_bwd(const at::Tensor& grad_out, const at::Tensor& slot_to_row,
                                               const std::optional<at::Tensor>& probs,
                                               const std::optional<at::Tensor>& y, int64_t top_k, int64_t num_rows) {
  check_cuda(grad_out, "unpermute_bwd", "grad_out");
  TORCH_CHECK(grad_out.dim() == 2, "engmoe::unpermute_bwd: grad_out must be [T, H]");
  c10::cuda::CUDAGuard guard(grad_out.device());
  const auto g = grad_out.contiguous();
  const auto s2r = index_tensor(slot_to_row, "unpermute_bwd", "slot_to_row");
  const int64_t T = g.size(0), H = g.size(1);
  TORCH_CHECK(s2r.numel() == T * top_k, "engmoe::unpermute_bwd: slot_to_row size mismatch");
  const auto p = probs_f32(probs, T * top_k, "unpermute_bwd");
  const bool need_dot = p.has_value() && y.has_value() && y->defined();
  at::Tensor yc;
  if (need_dot) {
    check_cuda(*y, "unpermute_bwd", "y");
    TORCH_CHECK(y->scalar_type() == g.scalar_type(), "engmoe::unpermute_bwd: y and grad_out dtypes differ");
    yc = y->contiguous();
    TORCH_CHECK(yc.dim() == 2 && yc.size(1) == H && yc.size(0) == num_rows, "engmoe::unpermute_bwd: y shape mismatch");
  }
  // rows that no slot points at (num_rows > T*k, or dropped slots) must still be defined: zero them
  auto grad_y = num_rows == T * top_k ? at::empty({num_rows, H}, g.options()) : at::zeros({num_rows, H}, g.options());
  auto grad_p = need_dot ? at::empty({T, top_k}, g.options().dtype(at::kFloat)) : at::empty({0}, g.options().dtype(at::kFloat));
  const bool v = vec_ok(H, g.element_size(), {g, grad_y, yc});
  check_launch(launch_unpermute_bwd(to_dtype(g, "unpermute_bwd"), g.data_ptr(), need_dot ? yc.data_ptr() : nullptr,
                                  s2r.data_ptr<int64_t>(), fptr(p), grad_y.data_ptr(),
                                  need_dot ? grad_p.data_ptr<float>() : nullptr, T, static_cast<int>(top_k), H, v,
                                  c10::cuda::getCurrentCUDAStream()),
               "unpermute_bwd");
  if (need_dot && probs->scalar_type() != at::kFloat) grad_p = grad_p.to(probs->scalar_type());
  if (need_dot) grad_p = grad_p.view(probs->sizes());
  return {grad_y, grad_p};
}

at::Tensor swiglu(const at::Tensor& h, const std::optional<at::Tensor>& row_scale) {
  check_cuda(h, "swiglu", "h");
  TORCH_CHECK(h.dim() == 2 && h.size(1) % 2 == 0, "engmoe::swiglu: h must be [N, 2F]");
  c10::cuda::CUDAGuard guard(h.device());
  const auto hc = h.contiguous();
  const int64_t N = hc.size(0), F = hc.size(1) / 2;
  const auto s = probs_f32(row_scale, N, "swiglu");
  auto out = at::empty({N, F}, hc.options());
  const bool v = vec_ok(F, hc.element_size(), {hc, out});
  check_launch(launch_swiglu(to_dtype(hc, "swiglu"), hc.data_ptr(), fptr(s), out.data_ptr(), N, F, v,
                             c10::cuda::getCurrentCUDAStream()),
               "swiglu");
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& grad_out, const at::Tensor& h,
                                              const std::optional<at::Tensor>& row_scale, bool need_grad_scale) {
  check_cuda(h, "swiglu_bwd", "h");
  check_cuda(grad_out, "swiglu_bwd", "grad_out");
  c10::cuda::CUDAGuard guard(h.device());
  const auto hc = h.contiguous();
  const int64_t N = hc.size(0), F = hc.size(1) / 2;
  const auto g = grad_out.to(hc.scalar_type()).contiguous();
  TORCH_CHECK(g.dim() == 2 && g.size(0) == N && g.size(1) == F, "engmoe::swiglu_bwd: grad_out shape mismatch");
  const auto s = probs_f32(row_scale, N, "swiglu_bwd");
  auto grad_h = at::empty_like(hc);
  const bool want = need_grad_scale && s.has_value();
  auto grad_s = at::empty({want ? N : 0}, hc.options().dtype(at::kFloat));
  const bool v = vec_ok(F, hc.element_size(), {hc, g, grad_h});
  check_launch(launch_swiglu_bwd(to_dtype(hc, "swiglu_bwd"), g.data_ptr(), hc.data_ptr(), fptr(s), grad_h.data_ptr(),
                                 want ? grad_s.data_ptr<float>() : nullptr, N, F, v, c10::cuda::getCurrentCUDAStream()),
               "swiglu_bwd");
  if (want) {
    grad_s = grad_s.view(row_scale->sizes());
    if (row_scale->scalar_type() != at::kFloat) grad_s = grad_s.to(row_scale->scalar_type());
  }
  return {grad_h, grad_s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> router_topk(const at::Tensor& logits, int64_t k, bool renorm) {
  check_cuda(logits, "router_topk", "logits");
  TORCH_CHECK(logits.dim() == 2, "engmoe::router_topk: logits must be [T, E]");
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(E >= 1 && E <= kMaxRouterExperts, "engmoe::router_topk: E must be in [1, ", kMaxRouterExperts, "]");
  TORCH_CHECK(k >= 1 && k <= E, "engmoe::router_topk: k must be in [1, E]");
  c10::cuda::CUDAGuard guard(logits.device());
  const auto l = logits.to(at::kFloat).contiguous();
  auto probs = at::empty({T, E}, l.options());
  auto tp = at::empty({T, k}, l.options());
  auto ti = at::empty({T, k}, l.options().dtype(at::kLong));
  check_launch(launch_router_topk(l.data_ptr<float>(), probs.data_ptr<float>(), tp.data_ptr<float>(),
                                   ti.data_ptr<int64_t>(), T, static_cast<int>(E), static_cast<int>(k), renorm,
                                   c10::cuda::getCurrentCUDAStream()),
               "router_topk");
  return {probs, tp, ti};
}

at::Tensor router_topk_bwd(const std::optional<at::Tensor>& grad_probs, const std::optional<at::Tensor>& grad_topk,
                            const at::Tensor& probs, const at::Tensor& topk_probs, const at::Tensor& topk_idx,
                            bool renorm) {
  check_cuda(probs, "router_topk_bwd", "probs");
  c10::cuda::CUDAGuard guard(probs.device());
  const int64_t T = probs.size(0), E = probs.size(1), k = topk_idx.size(1);
  const auto P = probs.to(at::kFloat).contiguous();
  const auto tp = topk_probs.to(at::kFloat).contiguous();
  const auto ti = index_tensor(topk_idx, "router_topk_bwd", "topk_idx");
  std::optional<at::Tensor> gp, gt;
  if (grad_probs.has_value() && grad_probs->defined()) gp = grad_probs->to(at::kFloat).contiguous();
  if (grad_topk.has_value() && grad_topk->defined()) gt = grad_topk->to(at::kFloat).contiguous();
  auto gl = at::empty({T, E}, P.options());
  check_launch(launch_router_topk_bwd(fptr(gp), fptr(gt), P.data_ptr<float>(), tp.data_ptr<float>(),
                                       ti.data_ptr<int64_t>(), gl.data_ptr<float>(), T, static_cast<int>(E),
                                       static_cast<int>(k), renorm, c10::cuda::getCurrentCUDAStream()),
               "router_topk_bwd");
  return gl;
}

// cross-entropy on [N, V] logits (a vocab-parallel shard starting at vocab_start); returns fp32 row stats
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_stats(const at::Tensor& logits, const at::Tensor& target,
                                                        int64_t vocab_start) {
  check_cuda(logits, "cross_entropy_stats", "logits");
  TORCH_CHECK(logits.dim() == 2, "engmoe::cross_entropy_stats: logits must be [N, V]");
  TORCH_CHECK(logits.is_contiguous(), "engmoe::cross_entropy_stats: logits must be contiguous");
  c10::cuda::CUDAGuard guard(logits.device());
  const auto t = index_tensor(target, "cross_entropy_stats", "target");
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(t.numel() == N, "engmoe::cross_entropy_stats: target has ", t.numel(), " entries, expected ", N);
  const auto fopts = logits.options().dtype(at::kFloat);
  auto row_max = at::empty({N}, fopts), row_sumexp = at::empty({N}, fopts), row_target = at::empty({N}, fopts);
  const bool v = vec_ok(V, logits.element_size(), {logits});
  check_launch(launch_cross_entropy_stats(to_dtype(logits, "cross_entropy_stats"), logits.data_ptr(), t.data_ptr<int64_t>(),
                               row_max.data_ptr<float>(), row_sumexp.data_ptr<float>(), row_target.data_ptr<float>(),
                               N, V, vocab_start, v, c10::cuda::getCurrentCUDAStream()),
               "cross_entropy_stats");
  return {row_max, row_sumexp, row_target};
}

// in place: logits <- (softmax(logits) - onehot(target)) * grad, softmax = exp(x - row_max) / sumexp with the
// global (all vocabulary shards) row max and sum-exp
void cross_entropy_backward_(at::Tensor& logits, const at::Tensor& target, const at::Tensor& row_max, const at::Tensor& sumexp,
             const at::Tensor& grad, int64_t vocab_start) {
  check_cuda(logits, "cross_entropy_backward_", "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "engmoe::cross_entropy_backward_: logits must be contiguous [N, V]");
  c10::cuda::CUDAGuard guard(logits.device());
  const auto t = index_tensor(target, "cross_entropy_backward_", "target");
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto m = row_max.to(at::kFloat).contiguous();
  const auto inv = sumexp.to(at::kFloat).reciprocal().contiguous();
  const auto g = grad.to(at::kFloat).contiguous();
  TORCH_CHECK(t.numel() == N && m.numel() == N && inv.numel() == N && g.numel() == N,
              "engmoe::cross_entropy_backward_: target/row_max/sumexp/grad need ", N, " entries");
  const bool v = vec_ok(V, logits.element_size(), {logits});
  check_launch(launch_cross_entropy_backward(to_dtype(logits, "cross_entropy_backward_"), logits.data_ptr(), t.data_ptr<int64_t>(),
                             m.data_ptr<float>(), inv.data_ptr<float>(), g.data_ptr<float>(), logits.data_ptr(), N, V,
                             vocab_start, v, c10::cuda::getCurrentCUDAStream()),
               "cross_entropy_backward_");
}

}  // namespace
}  // namespace engmoe

TORCH_LIBRARY(engmoe, m) {
  m.def("routing_maps(Tensor topk_idx, int num_experts) -> (Tensor, Tensor, Tensor)");
  m.def("permute(Tensor x, Tensor slot_to_row, int top_k, int num_rows) -> Tensor");
  m.def("unpermute(Tensor y, Tensor slot_to_row, Tensor? probs, int top_k) -> Tensor");
  m.def("unpermute_bwd(Tensor grad_out, Tensor slot_to_row, Tensor? probs, Tensor? y, int top_k, int num_rows) -> (Tensor, Tensor)");
  m.def("swiglu(Tensor h, Tensor? row_scale) -> Tensor");
  m.def("swiglu_bwd(Tensor grad_out, Tensor h, Tensor? row_scale, bool need_grad_scale) -> (Tensor, Tensor)");
  m.def("router_topk(Tensor logits, int k, bool renorm) -> (Tensor, Tensor, Tensor)");
  m.def("router_topk_bwd(Tensor? grad_probs, Tensor? grad_topk, Tensor probs, Tensor topk_probs, Tensor topk_idx, bool renorm) -> Tensor");
  m.def("cross_entropy_stats(Tensor logits, Tensor target, int vocab_start) -> (Tensor, Tensor, Tensor)");
  m.def("cross_entropy_backward_(Tensor(a!) logits, Tensor target, Tensor row_max, Tensor sumexp, Tensor grad, int vocab_start) -> ()");
}

TORCH_LIBRARY_IMPL(engmoe, CUDA, m) {
  m.impl("routing_maps", &engmoe::routing_maps);
  m.impl("permute", &engmoe::permute);
  m.impl("unpermute", &engmoe::unpermute);
  m.impl("unpermute_bwd", &engmoe::unpermute_bwd);
  m.impl("swiglu", &engmoe::swiglu);
  m.impl("swiglu_bwd", &engmoe::swiglu_bwd);
  m.impl("router_topk", &engmoe::router_topk);
  m.impl("router_topk_bwd", &engmoe::router_topk_bwd);
  m.impl("cross_entropy_stats", &engmoe::cross_entropy_stats);
  m.impl("cross_entropy_backward_", &engmoe::cross_entropy_backward_);
}

// `import engmoe._C` loads this library (and so runs the registrations above); the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
