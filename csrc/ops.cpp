// Every gdrd_fast_C op schema, in one place. Kernels register per dispatch key in csrc/cpu/*.cpp and
// csrc/cuda/*.cpp; Python wraps them as torch.library custom ops with autograd (gdrd_fast/ops/).
#include <Python.h>
#include <torch/library.h>

#include "python/host.h"

TORCH_LIBRARY(gdrd_fast_C, m) {
  // CRD's NCE loss over gathered bank rows (docs/ops/crd.md). Returns per-row losses [B] and, when
  // need_grad, d row_b / d anchor_b [B, D] (else an empty tensor), both in the accumulation dtype.
  m.def("crd_nce_forward(Tensor anchor, Tensor memory, Tensor idx, float inv_t, Tensor log_z, float c, "
        "float eps, bool need_grad) -> (Tensor, Tensor)");
  // Both sides of CRDLoss in one pass: idx is read once, row idx[b, k] of both banks is gathered.
  // Side a scores anchor_a against memory_a, side b anchor_b against memory_b.
  m.def("crd_nce_pair_forward(Tensor anchor_a, Tensor memory_a, Tensor log_z_a, Tensor anchor_b, "
        "Tensor memory_b, Tensor log_z_b, Tensor idx, float inv_t, float c, float eps, bool need_grad) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // crd_log_z's CPU kernel: logsumexp over the B(K+1) scores s[b, k] * inv_t, plus offset, as a 0-dim tensor
  // in the accumulation dtype (no gradient).
  m.def("crd_log_z(Tensor anchor, Tensor memory, Tensor idx, float inv_t, float offset) -> Tensor");
  // The losses' one-block paths as single C++ autograd nodes for eager calls (csrc/autograd/one_block.cpp),
  // the reduction folded in: 0 none (per-row losses in the input dtype), 1 mean, 2 sum.
  // feature_regression: student [B, Cs, ...], teacher [B, Ct, ...], weight [Ct, Cs] or [Ct, Cs, 1, 1],
  // bias [Ct] or none.
  m.def("feature_regression_one_block(Tensor student, Tensor teacher, Tensor weight, Tensor? bias, int reduction) "
        "-> Tensor");
  // infonce_bank_loss: query, positive [B, D], bank [K, D] (K >= 1, no gradient), inv_t = 1 / temperature.
  m.def("infonce_bank_one_block(Tensor query, Tensor positive, Tensor bank, float inv_t, int reduction) -> Tensor");
  // memory[idx] = normalize(m * memory[idx] + (1 - m) * values) from the rows before the call; the last
  // duplicate of idx wins (docs/ops/memory.md). The pair form updates two banks with one idx.
  m.def("bank_update_(Tensor(a!) memory, Tensor idx, Tensor values, float momentum) -> ()");
  m.def("bank_update_pair_(Tensor(a!) memory_a, Tensor values_a, Tensor(b!) memory_b, Tensor values_b, "
        "Tensor idx, float momentum) -> ()");
  // MemoryQueue.push_: rows of values go to slots ptr, ptr + 1, ... (mod size), the newest `size` kept;
  // ptr and count advance on the device (docs/ops/memory.md). Labels are written alongside when given.
  m.def("queue_push_(Tensor(a!) queue, Tensor(b!) ptr, Tensor(c!) count, Tensor values, Tensor? labels, "
        "Tensor(d!)? queue_labels) -> ()");
  // MemoryQueue.sample_negatives: [B, k] int64 draws, uniform with replacement over the first `filled`
  // rows, or with queue_labels over the rows of another class than partner_labels[b] (all -1 where none
  // is). seed is a one-element int64 tensor on the device; the draws follow csrc/sampling.h.
  m.def("queue_sample_negatives(Tensor? queue_labels, int filled, Tensor partner_labels, Tensor seed, int k) "
        "-> Tensor");
}

// The module: importing gdrd_fast._C runs the static registrations above; its functions are
// csrc/python/host.cpp's.
#define GDRD_FASTCALL(f) reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(f))
static PyMethodDef gdrd_methods[] = {
    {"signature", GDRD_FASTCALL(gdrd_signature), METH_FASTCALL,
     "signature(*tensors) -> bytes | None: the dtype, device, requires_grad and sizes of each argument"},
    {"draw_seed", gdrd_draw_seed, METH_O,
     "draw_seed(generator) -> Tensor | None: torch.randint(-2**63, 2**63 - 1, (1,)) from a CPU generator"},
    {"partner_without_negative", GDRD_FASTCALL(gdrd_partner_without_negative), METH_FASTCALL,
     "partner_without_negative(queue_labels, filled, partner_labels) -> int | None"},
    {"first_non_finite", GDRD_FASTCALL(gdrd_first_non_finite), METH_FASTCALL,
     "first_non_finite(*tensors) -> int | None: the index of the first holding a NaN or an Inf, or -1"},
    {nullptr, nullptr, 0, nullptr}};
static struct PyModuleDef gdrd_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, gdrd_methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&gdrd_module); }
