// Every gdrd_fast_C op schema, in one place. Kernels register per dispatch key in csrc/cpu/*.cpp and
// csrc/cuda/*.cpp; Python wraps them as torch.library custom ops with autograd (gdrd_fast/ops/).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(gdrd_fast_C, m) {
}

// A plain module object: importing gdrd_fast._C runs the static registrations above.
static struct PyModuleDef gdrd_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&gdrd_module); }
