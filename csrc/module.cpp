// The extension module haba_fast._C. Importing it runs the static TORCH_LIBRARY registrations of every
// translation unit in csrc/ (ops live under torch.ops.haba_fast). The Python module itself is empty:
// ops are called through the dispatcher, never through pybind11 bindings.
#include <Python.h>
#include <torch/library.h>

// The namespace is declared once here; every other file adds its ops with TORCH_LIBRARY_FRAGMENT.
TORCH_LIBRARY(haba_fast, m) {}

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "haba_fast C++ ops (registered in torch.ops.haba_fast)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
