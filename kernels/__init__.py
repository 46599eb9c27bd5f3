"""Triton kernels of the fused RSM ops, installed as ``rsm_fast.kernels`` (see README.md here).

Importing this package does not import Triton; the kernel modules do, lazily, when a CUDA tensor
(or ``TRITON_INTERPRET=1`` on CPU) asks for them."""

if __name__ == "kernels":
    # Imported as a top-level ``kernels``: the repository root is on sys.path (``python -m ...`` run
    # from the checkout), so this folder shadows PyPI's ``kernels`` (Hugging Face kernel hub, which
    # transformers installs and diffusers/peft import when its metadata says it is there). Give way
    # to that package if it is installed: load it from the rest of sys.path and put it in
    # sys.modules in our place, which the import system then returns.
    import importlib.machinery as _mach
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _rest = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    _spec = _mach.PathFinder.find_spec("kernels", _rest)
    if _spec is not None and _spec.loader is not None:
        _mod = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _mod
        _spec.loader.exec_module(_mod)
