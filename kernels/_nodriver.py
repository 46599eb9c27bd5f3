"""A stand-in CUDA driver for Triton on a machine without a GPU: real compiles, recorded launches.

With :func:`recording_driver` active (and ``TRITON_INTERPRET`` unset when Triton was imported),
``kernel[grid](...)`` runs Triton's whole launch path: the binder, the cache key, a real compile
for the target (default sm_90, Hopper, with the ptxas Triton ships), the ``CompiledKernel`` and
its launcher call. The launcher does not launch: it appends its arguments to
:attr:`RecordingDriver.launches`. The tests use it to check :mod:`._direct`'s launches against
Triton's own, and ``bench/bench_host_overhead.py --triton-launch`` to time Triton's per-launch host
work, which the interpreter does not have. Tensors are CPU tensors: their addresses stand in for
device pointers and nothing reads them.
"""
from __future__ import annotations

import contextlib

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver


class _Launcher:
    """In place of the driver's ``CudaLauncher``: records the call (or does nothing)."""

    def __init__(self, owner: "RecordingDriver", src, metadata):
        self.owner, self.metadata = owner, metadata

    def __call__(self, *args):
        if self.owner.record:
            self.owner.launches.append(args)


class _Utils:
    def __init__(self, owner: "RecordingDriver"):
        self.owner = owner

    def load_binary(self, name, kernel, shared, device):
        # (module, function, n_regs, n_spills, n_max_threads): a handle per kernel name
        return (0, self.owner.handle(name), 64, 0, 1024)

    def get_device_properties(self, device):
        return {"max_shared_mem": self.owner.max_shared, "multiprocessor_count": self.owner.sms,
                "max_num_regs": 65536, "warpSize": 32}


class RecordingDriver:
    """Triton's active-driver interface, far enough for ``JITFunction.run`` and ``CompiledKernel``."""

    def __init__(self, arch: int = 90, sms: int = 132, max_shared: int = 232448, record: bool = True):
        self.target = GPUTarget("cuda", arch, 32)
        self.sms, self.max_shared, self.record = sms, max_shared, record
        self.launches: list[tuple] = []
        self.handles: dict[str, int] = {}
        self.utils = _Utils(self)
        self.stream = 7          # the raw stream every launch reports

    def handle(self, name: str) -> int:
        return self.handles.setdefault(name, 1000 + len(self.handles))

    def launcher_cls(self, src, metadata):
        return _Launcher(self, src, metadata)

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device=None) -> int:
        return self.stream

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty


@contextlib.contextmanager
def recording_driver(**kw):
    """A :class:`RecordingDriver` as Triton's active driver for the block; the previous one after."""
    prev = driver._active
    d = RecordingDriver(**kw)
    driver.set_active(d)
    try:
        yield d
    finally:
        driver._active = prev
