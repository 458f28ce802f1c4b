// The simmim_fast operator library: schemas here, CUDA kernels in the .cu files
// (TORCH_LIBRARY_IMPL(simmim_fast, CUDA, ...)), fake (meta) kernels and autograd in
// simmim_fast/cuda_ops.py. Loading the built module registers torch.ops.simmim_fast.*.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(simmim_fast, m) {
  // Returns (loss, denominator): the fp32 loss and the masked pixel count + 1e-5 it was divided by,
  // which the backward reuses instead of counting again.
  m.def(
      "masked_l1_loss(Tensor reconstruction, Tensor target, Tensor mask, int patch_size, int in_chans, "
      "int shuffle_stride) -> (Tensor, Tensor)");
  // d loss / d reconstruction, in the reconstruction's (pre-shuffle) layout.
  m.def(
      "masked_l1_loss_backward(Tensor grad_loss, Tensor denominator, Tensor reconstruction, Tensor target, "
      "Tensor mask, int patch_size, int in_chans, int shuffle_stride) -> Tensor");
  m.def("mask_token_blend(Tensor tokens, Tensor mask, Tensor mask_token) -> Tensor");
  // (d tokens, d mask_token).
  m.def("mask_token_blend_backward(Tensor grad_out, Tensor mask, Tensor mask_token) -> (Tensor, Tensor)");
}

// `import simmim_fast._C` needs a module init; the module itself is empty (the ops live in torch.ops).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "Registers torch.ops.simmim_fast.*", -1, nullptr};
  return PyModule_Create(&module);
}
