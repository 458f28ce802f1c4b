"""Fused Triton kernels, installed as ``simmim_fast.kernels``: one op per module.

Each module holds its private ``_<op>_fwd_kernel``/``_<op>_bwd_kernel``, a launcher, and an
autograd Function; its public function has the signature of ``simmim_fast.reference.<op>``.
Importing a module here imports triton: only the dispatch does that, lazily.
"""
