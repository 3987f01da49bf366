// The Python module prefix_kernels.ops._C. Importing it loads this library, whose static initializers register
// the C++ implementations of the prefix_kernels ops (TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda). The op
// schemas are not here: prefix_kernels.ops defines them (docs/op.md) before it imports this module.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "prefix_kernels.ops._C",
      "C++ CPU and CUDA implementations of the prefix_kernels ops (cpu_fwd, cpu_bwd, cuda_fwd, cuda_bwd)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
}
