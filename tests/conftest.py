"""Shared pytest fixtures."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter; the flag must be set before any
# kernel module is imported (the kernel test files import them at collection time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The diffusers tasks keep a text-embedding cache on by default ($RSM_FAST_CACHE/text, else
# ~/.cache/rsm_fast/text): the suite writes its own, never the user's (subprocesses inherit it).
if "RSM_FAST_CACHE" not in os.environ:
    import tempfile

    os.environ["RSM_FAST_CACHE"] = tempfile.mkdtemp(prefix="rsm_fast-test-cache-")

# Tensor methods that read device memory back to the host (a CUDA sync). Code that runs inside a
# sampling / training step must never call them.
HOST_SYNC_METHODS = ("item", "tolist", "__bool__", "cpu", "numpy", "__float__", "__int__", "__index__")


@pytest.fixture
def no_host_sync():
    """Context-manager factory: inside ``with no_host_sync():`` any call of a host-sync Tensor
    method (``HOST_SYNC_METHODS``) raises ``RuntimeError``; they are restored on exit.

    Usage::

        def test_x(no_host_sync):
            with no_host_sync():
                out = code_under_test(...)
            assert torch.allclose(out, expected)   # check outside the guard
    """

    def _raiser(name):
        def _raise(self, *args, **kwargs):
            raise RuntimeError(f"host sync: Tensor.{name} called inside a no_host_sync() block")

        return _raise

    @contextlib.contextmanager
    def guard():
        with pytest.MonkeyPatch.context() as mp:
            for name in HOST_SYNC_METHODS:
                mp.setattr(torch.Tensor, name, _raiser(name))
            yield

    return guard


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests (OpenMP threads on a loaded 2-core
    machine spin for milliseconds per op); restored afterwards. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
