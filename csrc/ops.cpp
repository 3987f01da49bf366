// Operator schemas of prefix_kernels._C (DESIGN.md "The op"). The CPU kernels live in csrc/cpu/, the CUDA
// kernels in csrc/cuda/; both register implementations of exactly these schemas.
#include <Python.h>

#include <torch/library.h>

extern "C" {
// `from prefix_kernels import _C` loads this library, which runs the TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "prefix_kernels C++/CUDA operators (torch.ops.prefix_kernels)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(prefix_kernels, m) {
  m.def(
      "cpp_fwd(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor? key_padding_mask, "
      "Tensor? prefix_index, bool causal, float scale, float dropout_p, int seed) -> (Tensor out, Tensor lse)");
  m.def(
      "cpp_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor out, "
      "Tensor lse, Tensor? key_padding_mask, Tensor? prefix_index, bool causal, float scale, float dropout_p, "
      "int seed) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dprefix_k, Tensor dprefix_v)");
  m.def("cpp_dropout_mask(int B, int Hq, int L, int P, int S, float dropout_p, int seed) -> Tensor");
}
