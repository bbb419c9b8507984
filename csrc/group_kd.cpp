// The schemas of orc_fast's C++ ops (docs/design.md §4) and the Python module stub.
// Implementations register against them per device: csrc/cpu (CPU), csrc/cuda (CUDA).
// group_kd_fused's autograd and fake (meta) implementation are registered from Python,
// in orc_fast/ops.py; group_kd_scale_grad (the fused op's backward product, written into
// huge pages on the CPU) has a CompositeExplicitAutograd fallback in csrc/cpu that also
// serves meta tensors.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import orc_fast._C` only has to load this library so the registrations below run.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(orc_fast, m) {
  m.def(
      "group_kd_fused(Tensor student, Tensor teachers, Tensor target, Tensor teacher_weights, "
      "Tensor alpha, Tensor error_members, float temperature, int ignore_index, int error_rule) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("group_kd_scale_grad(Tensor per_sample_grad, Tensor grad_loss) -> Tensor");
}
