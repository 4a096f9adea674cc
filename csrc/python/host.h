// The CPython functions of the gdrd_fast._C module itself (csrc/python/host.cpp; csrc/ops.cpp's method table).
#pragma once
#include <Python.h>

PyObject* gdrd_signature(PyObject* self, PyObject* const* args, Py_ssize_t nargs);
PyObject* gdrd_draw_seed(PyObject* self, PyObject* generator);
PyObject* gdrd_partner_without_negative(PyObject* self, PyObject* const* args, Py_ssize_t nargs);
PyObject* gdrd_first_non_finite(PyObject* self, PyObject* const* args, Py_ssize_t nargs);
