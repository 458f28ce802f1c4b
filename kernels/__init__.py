"""Fused Triton kernels, installed as ``simmim_fast.kernels``: one op per module.

Each module holds its private ``_<op>_fwd_kernel``/``_<op>_bwd_kernel``, a launcher, and its
registration (torch.library custom ops ``simmim_fast_triton::<op>`` and ``..._backward`` with fake
implementations and autograd, or an autograd Function); its public function has the signature of
``simmim_fast.reference.<op>``.
Importing a module here imports triton: only the dispatch does that, lazily.
"""
