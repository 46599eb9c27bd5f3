"""Triton kernels of the fused RSM ops, installed as ``rsm_fast.kernels`` (see README.md here).

Importing this package does not import Triton; the kernel modules do, lazily, when a CUDA tensor
(or ``TRITON_INTERPRET=1`` on CPU) asks for them."""
