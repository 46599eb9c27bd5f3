"""C++ CPU kernels of the fused RSM ops, installed as ``rsm_fast.csrc`` so that the sources ship
with the package; they are compiled on first use by ``rsm_fast.ops.cpu_ext``."""
