// Host-side helpers of the Python layer, as plain CPython functions of gdrd_fast._C rather than torch ops:
// a torch op's dispatch costs the host about 1.5 us a call, these a few tenths. Each serves a check or a
// draw that every small call makes (gdrd_fast/validation.py, gdrd_fast/memory.py). None is every function's
// answer for what it does not handle; no C++ exception may leave one (CPython would abort), so a tensor that
// ATen refuses to read (nested, sparse, an unusual dtype) also gives None, and the caller's torch path then
// decides.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/DistributionsHelper.h>
#include <torch/csrc/Generator.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <limits>
#include <mutex>
#include <vector>

#include "../cpu/checks.h"
#include "host.h"

// signature(*args): the exact structure of a call's tensor arguments, as bytes, for the argument checks to
// cache by (validation.structure_checked). Per argument it packs what those checks read: None, or a
// tensor's dtype, device, requires_grad, dim and sizes. Any other argument returns None, so that the full
// checks run and name it.
PyObject* gdrd_signature(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  std::vector<int64_t> packed;
  packed.reserve(static_cast<size_t>(nargs) * 8);
  for (Py_ssize_t i = 0; i < nargs; ++i) {
    PyObject* arg = args[i];
    if (arg == Py_None) {
      packed.push_back(-1);
      continue;
    }
    if (!THPVariable_Check(arg)) Py_RETURN_NONE;
    const at::Tensor& t = THPVariable_Unpack(arg);
    if (t.is_nested() || t.layout() != at::kStrided) Py_RETURN_NONE;  // sizes() may throw for these
    packed.push_back(static_cast<int64_t>(t.scalar_type()));
    packed.push_back(static_cast<int64_t>(t.device().type()));
    packed.push_back(static_cast<int64_t>(t.device().index()));
    packed.push_back(t.requires_grad());
    packed.push_back(t.dim());
    for (const int64_t size : t.sizes()) packed.push_back(size);
  }
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(packed.data()),
                                   static_cast<Py_ssize_t>(packed.size() * sizeof(int64_t)));
}

// draw_seed(generator): a CPU generator's next draw of torch.randint(-2**63, 2**63 - 1, (1,)), the same value
// from the same state, as a one-element int64 CPU tensor (MemoryQueue's sampling seed). None for any other
// argument: the caller then draws with torch.randint.
PyObject* gdrd_draw_seed(PyObject* /*self*/, PyObject* generator) {
  if (!THPGenerator_Check(generator)) Py_RETURN_NONE;
  at::Generator gen = THPGenerator_Unwrap(generator);
  if (gen.device().type() != at::kCPU) Py_RETURN_NONE;
  const int64_t low = std::numeric_limits<int64_t>::min(), high = std::numeric_limits<int64_t>::max();
  at::uniform_int_from_to_distribution<int64_t> draw(static_cast<uint64_t>(high) - static_cast<uint64_t>(low),
                                                     low);
  at::Tensor out;
  try {
    out = at::empty({1}, at::kLong);  // before the draw: a failure here leaves the generator as it was
    auto* cpu = at::check_generator<at::CPUGeneratorImpl>(gen);
    std::lock_guard<std::mutex> lock(cpu->mutex_);
    out.data_ptr<int64_t>()[0] = draw(cpu);
  } catch (...) {
    Py_RETURN_NONE;
  }
  return THPVariable_Wrap(out);
}

// partner_without_negative(queue_labels, filled, partner_labels): the first b whose partner_labels[b] is the
// label of every one of the first `filled` queued rows (that partner has no negative of another class), or
// -1; None where it does not apply (not contiguous CPU int64 tensors), and the caller checks in torch.
PyObject* gdrd_partner_without_negative(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 3 || !THPVariable_Check(args[0]) || !THPVariable_Check(args[2]) || !PyLong_Check(args[1])) {
    Py_RETURN_NONE;
  }
  const at::Tensor& queued = THPVariable_Unpack(args[0]);
  const at::Tensor& partners = THPVariable_Unpack(args[2]);
  const int64_t filled = PyLong_AsLongLong(args[1]);
  if (filled == -1 && PyErr_Occurred()) {  // beyond int64: not ours to judge
    PyErr_Clear();
    Py_RETURN_NONE;
  }
  for (const at::Tensor* t : {&queued, &partners}) {
    if (!t->device().is_cpu() || t->scalar_type() != at::kLong || t->dim() != 1 || !t->is_contiguous()) {
      Py_RETURN_NONE;
    }
  }
  if (filled < 1 || filled > queued.size(0)) Py_RETURN_NONE;
  const int64_t* labels = queued.data_ptr<int64_t>();
  for (int64_t i = 1; i < filled; ++i) {
    if (labels[i] != labels[0]) return PyLong_FromLongLong(-1);  // two classes: every partner has a negative
  }
  const int64_t* partner = partners.data_ptr<int64_t>();
  for (int64_t b = 0; b < partners.size(0); ++b) {
    if (partner[b] == labels[0]) return PyLong_FromLongLong(b);
  }
  return PyLong_FromLongLong(-1);
}

// first_non_finite(*tensors): the index of the first tensor holding a NaN or an Inf, or -1: the value check
// of every tensor a call reads, in one call (validation.finite_each; the scan is csrc/cpu/checks.cpp's).
// None where an argument is not a floating-point CPU tensor: the caller then checks in torch. The GIL is
// released while the tensors are read (a large bank takes milliseconds).
PyObject* gdrd_first_non_finite(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  std::vector<at::Tensor> tensors;
  tensors.reserve(static_cast<size_t>(nargs));
  for (Py_ssize_t i = 0; i < nargs; ++i) {
    if (!THPVariable_Check(args[i])) Py_RETURN_NONE;
    const at::Tensor& t = THPVariable_Unpack(args[i]);
    const auto dtype = t.scalar_type();
    const bool scanned = dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
    if (!scanned || !t.device().is_cpu() || t.is_nested() || t.layout() != at::kStrided) Py_RETURN_NONE;
    tensors.push_back(t);
  }
  int64_t first = -1;
  bool failed = false;
  Py_BEGIN_ALLOW_THREADS
  try {
    for (size_t i = 0; i < tensors.size() && first < 0; ++i) {
      if (!gdrd::all_finite(tensors[i])) first = static_cast<int64_t>(i);
    }
  } catch (...) {  // e.g. no memory for a contiguous copy
    failed = true;
  }
  Py_END_ALLOW_THREADS
  if (failed) Py_RETURN_NONE;
  return PyLong_FromLongLong(first);
}
