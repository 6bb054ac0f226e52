// The Python extension module robust_diffusion._C. It has no functions of its own: importing it loads
// the shared library, whose static initialisers register every operator with the dispatcher
// (torch.ops.robust_diffusion.*). The op library itself (csrc/) is Python-free, for LibTorch.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "robust_diffusion operators", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
