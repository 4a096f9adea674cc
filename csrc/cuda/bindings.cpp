// Torch binding of the CUDA kernels: checks, dtype preparation and outputs here; the kernels in
// crd_nce.cu, bank_update.cu and queue.cu see raw pointers only (launchers.h). Importing gdrd_fast._C_cuda
// registers the CUDA implementations of the schemas in csrc/ops.cpp; it works without a GPU.
#include <Python.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

#include "launchers.h"

#ifndef GDRD_ARCH_LIST
#define GDRD_ARCH_LIST "unknown"
#endif
#ifndef GDRD_CUDA_VERSION
#define GDRD_CUDA_VERSION "unknown"
#endif

namespace {

using gdrd::cuda::Dtype;

Dtype dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::f32;
    case at::kDouble: return Dtype::f64;
    case at::kHalf: return Dtype::f16;
    case at::kBFloat16: return Dtype::bf16;
    default: TORCH_CHECK(false, "gdrd_fast CUDA kernels: unsupported dtype ", t.scalar_type());
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

void check_idx(const at::Tensor& idx, int64_t dims) {
  TORCH_CHECK(idx.is_cuda() && idx.dim() == dims, "idx must be a ", dims, "-D CUDA tensor, got ", idx.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong, "idx must be int32 or int64");
}

// The accumulation dtype: float64 only for an f64 bank with f64 anchors, else float32.
at::ScalarType acc_dtype(const at::Tensor& anchor, const at::Tensor& memory) {
  return anchor.scalar_type() == at::kDouble && memory.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

struct PreparedSide {
  at::Tensor anchor, memory, log_z, rows, grad;
};

PreparedSide prepare(const at::Tensor& anchor, const at::Tensor& memory, const at::Tensor& log_z,
                     const at::Tensor& idx, bool need_grad) {
  TORCH_CHECK(anchor.is_cuda() && memory.is_cuda() && log_z.is_cuda(), "crd_nce (CUDA): CUDA tensors expected");
  TORCH_CHECK(anchor.dim() == 2 && memory.dim() == 2 && anchor.size(1) == memory.size(1) &&
                  anchor.size(0) == idx.size(0),
              "crd_nce (CUDA): anchor [B, D], memory [N, D], idx [B, K+1] expected, got ", anchor.sizes(), ", ",
              memory.sizes(), ", ", idx.sizes());
  TORCH_CHECK(anchor.size(1) <= gdrd::cuda::max_dim(), "crd_nce (CUDA): D must be <= ", gdrd::cuda::max_dim());
  TORCH_CHECK(log_z.numel() == 1, "crd_nce (CUDA): log_z must hold one value");
  TORCH_CHECK((anchor.scalar_type() == at::kDouble) == (memory.scalar_type() == at::kDouble),
              "crd_nce (CUDA): a float64 bank needs float64 anchors and the reverse, got ", anchor.scalar_type(),
              " and ", memory.scalar_type());
  const auto acc = acc_dtype(anchor, memory);
  PreparedSide p{anchor.to(acc).contiguous(), memory.contiguous(), log_z.to(at::kDouble).contiguous(), {}, {}};
  p.rows = at::zeros({anchor.size(0)}, anchor.options().dtype(acc));  // blocks add partial sums into them
  p.grad = need_grad ? at::zeros(anchor.sizes(), p.rows.options()) : at::empty({0}, p.rows.options());
  return p;
}

template <size_t SIDES>
void launch_crd(std::array<PreparedSide, SIDES>& p, const at::Tensor& idx_in, double inv_t, double c, double eps,
                bool need_grad) {
  check_idx(idx_in, 2);
  TORCH_CHECK(idx_in.size(1) >= 2 && c > 0 && eps >= 0, "crd_nce (CUDA): need K >= 1, c > 0, eps >= 0");
  TORCH_CHECK((idx_in.size(1) + 511) / 512 <= 65535, "crd_nce (CUDA): K is too large");
  for (const auto& side : p)
    TORCH_CHECK(side.anchor.scalar_type() == p[0].anchor.scalar_type() &&
                    side.memory.scalar_type() == p[0].memory.scalar_type(),
                "crd_nce_pair_forward (CUDA): both sides need the same dtypes");
  const auto idx = idx_in.contiguous();
  const c10::cuda::CUDAGuard guard(idx.device());
  std::array<gdrd::cuda::CrdSide, SIDES> sides;
  for (size_t s = 0; s < SIDES; ++s)
    sides[s] = {p[s].anchor.data_ptr(), p[s].memory.data_ptr(), p[s].log_z.template data_ptr<double>(), p[s].rows.data_ptr(),
                need_grad ? p[s].grad.data_ptr() : nullptr};
  if (idx.size(0) == 0) return;
  check_launch(gdrd::cuda::crd_nce_launch(sides.data(), SIDES, dtype_of(p[0].anchor), dtype_of(p[0].memory),
                                          idx.data_ptr(), idx.scalar_type() == at::kLong, idx.size(0), idx.size(1),
                                          p[0].anchor.size(1), inv_t, c, eps, c10::cuda::getCurrentCUDAStream()),
               "crd_nce");
}

std::tuple<at::Tensor, at::Tensor> crd_nce_forward(const at::Tensor& anchor, const at::Tensor& memory,
                                                   const at::Tensor& idx, double inv_t, const at::Tensor& log_z,
                                                   double c, double eps, bool need_grad) {
  std::array<PreparedSide, 1> p{prepare(anchor, memory, log_z, idx, need_grad)};
  launch_crd(p, idx, inv_t, c, eps, need_grad);
  return {p[0].rows, p[0].grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> crd_nce_pair_forward(
    const at::Tensor& anchor_a, const at::Tensor& memory_a, const at::Tensor& log_z_a, const at::Tensor& anchor_b,
    const at::Tensor& memory_b, const at::Tensor& log_z_b, const at::Tensor& idx, double inv_t, double c, double eps,
    bool need_grad) {
  std::array<PreparedSide, 2> p{prepare(anchor_a, memory_a, log_z_a, idx, need_grad),
                                prepare(anchor_b, memory_b, log_z_b, idx, need_grad)};
  launch_crd(p, idx, inv_t, c, eps, need_grad);
  return {p[0].rows, p[0].grad, p[1].rows, p[1].grad};
}

void update_banks(const std::vector<at::Tensor>& memories, const std::vector<at::Tensor>& values,
                  const at::Tensor& idx_in, double momentum) {
  check_idx(idx_in, 1);
  TORCH_CHECK(momentum >= 0 && momentum < 1, "momentum must be in [0, 1), got ", momentum);
  std::vector<at::Tensor> prepared;
  std::vector<void*> memory_ptrs;
  std::vector<const void*> value_ptrs;
  for (size_t s = 0; s < memories.size(); ++s) {
    const auto& memory = memories[s];
    TORCH_CHECK(memory.is_cuda() && memory.is_contiguous() && memory.dim() == 2,
                "bank update (CUDA): the bank must be a contiguous 2-D CUDA tensor (it is updated in place)");
    TORCH_CHECK(memory.scalar_type() == memories[0].scalar_type(), "bank_update_pair_: both banks need one dtype");
    TORCH_CHECK(values[s].dim() == 2 && values[s].size(0) == idx_in.size(0) && values[s].size(1) == memory.size(1),
                "bank update (CUDA): values must be [len(idx), D], got ", values[s].sizes());
    const auto acc = memory.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    prepared.push_back(values[s].to(acc).contiguous());
    memory_ptrs.push_back(memory.data_ptr());
    value_ptrs.push_back(prepared.back().data_ptr());
  }
  const auto idx = idx_in.contiguous();
  const c10::cuda::CUDAGuard guard(idx.device());
  check_launch(gdrd::cuda::bank_update_launch(memory_ptrs.data(), value_ptrs.data(), int(memories.size()),
                                              dtype_of(memories[0]), idx.data_ptr(), idx.scalar_type() == at::kLong,
                                              idx.numel(), memories[0].size(1), momentum,
                                              c10::cuda::getCurrentCUDAStream()),
               "bank_update");
}

void bank_update_(at::Tensor memory, const at::Tensor& idx, const at::Tensor& values, double momentum) {
  update_banks({memory}, {values}, idx, momentum);
}

void bank_update_pair_(at::Tensor memory_a, const at::Tensor& values_a, at::Tensor memory_b,
                       const at::Tensor& values_b, const at::Tensor& idx, double momentum) {
  TORCH_CHECK(memory_a.size(0) == memory_b.size(0), "bank_update_pair_: both banks need the same number of rows");
  update_banks({memory_a, memory_b}, {values_a, values_b}, idx, momentum);
}

void queue_push_(at::Tensor queue, at::Tensor ptr, at::Tensor count, const at::Tensor& values,
                 const c10::optional<at::Tensor>& labels, const c10::optional<at::Tensor>& queue_labels) {
  TORCH_CHECK(queue.is_cuda() && queue.dim() == 2 && queue.is_contiguous(),
              "queue_push_ (CUDA): the queue must be a contiguous 2-D CUDA tensor");
  TORCH_CHECK(values.dim() == 2 && values.size(1) == queue.size(1), "queue_push_ (CUDA): values must be [n, ",
              queue.size(1), "], got ", values.sizes());
  for (const auto* t : {&ptr, &count})
    TORCH_CHECK(t->is_cuda() && t->numel() == 1 && t->scalar_type() == at::kLong,
                "queue_push_ (CUDA): ptr and count must be one-element int64 CUDA tensors");
  TORCH_CHECK(labels.has_value() == queue_labels.has_value(), "queue_push_: labels and queue_labels go together");
  const int64_t size = queue.size(0), n = values.size(0), m = std::min(n, size);
  const c10::cuda::CUDAGuard guard(queue.device());
  // only the newest `size` rows of a long push survive: the others are never copied
  const auto rows = values.narrow(0, n - m, m).to(queue.scalar_type()).contiguous();
  at::Tensor kept_labels;
  if (queue_labels.has_value()) {
    TORCH_CHECK(queue_labels->is_cuda() && queue_labels->dim() == 1 && queue_labels->size(0) == size &&
                    queue_labels->is_contiguous() && queue_labels->scalar_type() == at::kLong,
                "queue_push_ (CUDA): queue_labels must be a contiguous int64 CUDA tensor of the queue's length");
    TORCH_CHECK(labels->dim() == 1 && labels->size(0) == n, "queue_push_ (CUDA): labels must be [n]");
    kept_labels = labels->narrow(0, n - m, m).to(at::kLong).contiguous();
  }
  check_launch(gdrd::cuda::queue_push_launch(
                   queue.data_ptr(), rows.data_ptr(),
                   queue_labels.has_value() ? queue_labels->data_ptr<int64_t>() : nullptr,
                   queue_labels.has_value() ? kept_labels.data_ptr<int64_t>() : nullptr, ptr.data_ptr<int64_t>(),
                   count.data_ptr<int64_t>(), size, n, m, queue.size(1) * queue.element_size(),
                   c10::cuda::getCurrentCUDAStream()),
               "queue_push_");
}

at::Tensor queue_sample_negatives(const c10::optional<at::Tensor>& queue_labels, int64_t filled,
                                  const at::Tensor& partner_labels, const at::Tensor& seed, int64_t k) {
  TORCH_CHECK(filled > 0 && k > 0, "queue_sample_negatives: need filled > 0 and k > 0");
  TORCH_CHECK(partner_labels.is_cuda() && partner_labels.dim() == 1,
              "queue_sample_negatives (CUDA): partner_labels must be a 1-D CUDA tensor");
  TORCH_CHECK(seed.is_cuda() && seed.numel() == 1 && seed.scalar_type() == at::kLong,
              "queue_sample_negatives (CUDA): seed must be one int64 on the GPU");
  TORCH_CHECK(seed.device() == partner_labels.device(), "queue_sample_negatives (CUDA): seed and partner_labels must share a device");
  const c10::cuda::CUDAGuard guard(partner_labels.device());
  const auto partner = partner_labels.to(at::kLong).contiguous();
  auto out = at::empty({partner.size(0), k}, partner.options());
  at::Tensor sorted_labels, order;
  if (queue_labels.has_value()) {
    TORCH_CHECK(queue_labels->is_cuda() && queue_labels->dim() == 1 && queue_labels->size(0) >= filled,
                "queue_sample_negatives (CUDA): queue_labels must be 1-D with at least `filled` entries");
    // stable, so equal labels keep queue order and every backend ranks the rows alike
    std::tie(sorted_labels, order) = at::sort(queue_labels->narrow(0, 0, filled).to(at::kLong), true, 0, false);
  }
  check_launch(gdrd::cuda::queue_sample_launch(
                   out.data_ptr<int64_t>(), queue_labels.has_value() ? sorted_labels.data_ptr<int64_t>() : nullptr,
                   queue_labels.has_value() ? order.data_ptr<int64_t>() : nullptr, partner.data_ptr<int64_t>(),
                   seed.contiguous().data_ptr<int64_t>(), filled, partner.size(0), k,
                   c10::cuda::getCurrentCUDAStream()),
               "queue_sample_negatives");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gdrd_fast_C, CUDA, m) {
  m.impl("crd_nce_forward", &crd_nce_forward);
  m.impl("crd_nce_pair_forward", &crd_nce_pair_forward);
  m.impl("bank_update_", &bank_update_);
  m.impl("bank_update_pair_", &bank_update_pair_);
  m.impl("queue_push_", &queue_push_);
  m.impl("queue_sample_negatives", &queue_sample_negatives);
}

// gdrd_fast._C_cuda: what it was built for, read by gdrd_fast.env_report().
static struct PyModuleDef gdrd_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C_cuda(void) {
  PyObject* module = PyModule_Create(&gdrd_cuda_module);
  if (module != nullptr) {
    PyModule_AddStringConstant(module, "ARCH_LIST", GDRD_ARCH_LIST);
    PyModule_AddStringConstant(module, "CUDA_VERSION", GDRD_CUDA_VERSION);
  }
  return module;
}
