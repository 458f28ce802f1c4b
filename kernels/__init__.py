"""Fused Triton kernels, installed as ``simmim_fast.kernels``: one op per module.

Each module holds its private ``_<op>_fwd_kernel``/``_<op>_bwd_kernel``, a launcher, and its
registration (torch.library custom ops ``simmim_fast_triton::<op>`` and ``..._backward`` with fake
implementations and autograd); its public function has the signature of ``simmim_fast.reference.<op>``
and calls the op through ``_eager`` (the custom op when traced, its implementation in eager mode).
Importing a module here imports triton: only the dispatch does that, lazily.

This folder is never a top-level module. ``python -c``/``python -m`` started in the repository root put
the root first on ``sys.path``, and then ``import kernels`` (Hugging Face's package, which transformers
imports) would find this folder. So when imported under the top-level name, it hands the import over to the
next ``kernels`` on the path, or raises ImportError when there is none.
"""
if __name__ == "kernels":
    import importlib.util
    import os
    import sys
    from importlib.machinery import PathFinder

    _this_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _other_entries = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _this_root]
    _spec = PathFinder.find_spec("kernels", _other_entries)
    if _spec is None:
        raise ImportError("no top-level 'kernels' package is installed; this repository's kernels/ folder is "
                          "simmim_fast.kernels (import it under that name)", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds after this runs
    _spec.loader.exec_module(_module)
