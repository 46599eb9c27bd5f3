"""Direct launches: Triton's compiled kernel called without Triton's per-call launch path.

``kernel[grid](*args, **meta)`` runs ``JITFunction.run`` on every call: it binds the arguments to
the signature, works out each one's specialisation (pointer dtype and 16-byte alignment, ints equal
to 1 or divisible by 16, their width), hashes that into the kernel-cache key, looks the compiled
kernel up, builds a launch-metadata dict and passes the launch hooks to the driver. That is tens
of µs of Python per launch (``bench/bench_host_overhead.py --triton-launch`` measures it), paid
three times by every fused-loss forward + backward and once per rollout step by the noise kernel,
while the kernels themselves run for a few µs (issue 21 item 6).

:func:`direct` wraps a launched ``@triton.jit`` kernel. The first call for a given *argument
signature* goes through Triton (which compiles if needed, launches, and returns the
``CompiledKernel``); the wrapper keeps that kernel's launcher, function handle, packed metadata and
the constexpr arguments' values, and later calls with the same signature call the launcher
directly, with exactly the arguments Triton passes (every parameter in signature order,
constexprs included). The signature is a key at least as fine as Triton's: the current device;
per tensor its dtype and whether its address is 16-byte aligned; per int whether it is 1, whether
it is a multiple of 16 (both left out for ``do_not_specialize`` parameters) and its width class
(32-bit, 64-bit, unsigned 64-bit); bools, ``None`` and the keyword arguments (constexprs and
launch options such as ``num_warps``) by value; floats by type. Two calls with one key therefore
have one Triton cache key (``tests/test_kernels_direct.py`` checks this against Triton's own
binder on random arguments), so they run the same compiled kernel.

Triton's path is kept (every call goes through it) where its per-call work is wanted: while a
launch hook is registered (``triton.knobs.runtime.launch_enter_hook`` / ``launch_exit_hook``:
profilers such as proton read the launch metadata there), and under ``TRITON_INTERPRET=1``, where
:func:`direct` returns the kernel unchanged. Not re-checked on the direct path: Triton's guard
that the kernel's global values have not changed since it was compiled (the kernels here read
no mutable globals), and knobs read at compile time (``TRITON_DEBUG``) changed within a process.
"""
from __future__ import annotations

import functools

from triton import knobs
from triton.runtime.driver import driver

from . import _launch as L

_I32 = 1 << 31
_U63 = 1 << 63


def _hooked() -> bool:
    """Whether a launch hook is registered (Triton 3.7: ``HookChain`` objects, empty by default;
    earlier: ``None`` unless set)."""
    rt = knobs.runtime
    for h in (rt.launch_enter_hook, rt.launch_exit_hook):
        if h is not None and getattr(h, "calls", True):
            return True
    return False


class DirectKernel:
    """A ``@triton.jit`` kernel launched as ``k[grid](*args, **meta)``, Triton's way the first time
    per argument signature and directly after (module docstring)."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "kernel")
        self.__doc__ = fn.__doc__
        # per positional parameter: 0 = specialise ints on value (== 1, % 16), 1 = do_not_specialize
        self._nospec = tuple(1 if p.do_not_specialize else 0 for p in fn.params)
        self._entries: dict = {}

    def __getitem__(self, grid):
        return functools.partial(self.launch, grid)

    def key(self, args: tuple, meta: dict) -> tuple:
        """The argument signature (module docstring): equal keys => equal Triton cache keys."""
        spec = []
        add = spec.append
        for a, nospec in zip(args, self._nospec):
            cls = a.__class__
            if cls is int:
                wide = 0 if -_I32 <= a < _I32 else 2 if a >= _U63 else 1
                add((wide,) if nospec else (wide, a == 1, not a & 15))
            elif cls is float:
                add(float)
            elif cls is bool or a is None:
                add(a)
            else:   # a tensor: pointer dtype and alignment
                add((a.dtype, not a.data_ptr() & 15))
        return (driver.active.get_current_device(), tuple(spec), tuple(meta.items()))

    def launch(self, grid, *args, **meta):
        if _hooked():
            return self.fn[grid](*args, **meta)
        key = self.key(args, meta)
        entry = self._entries.get(key)
        if entry is None:
            return self._first(key, grid, args, meta)
        run, function, packed, tail = entry
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        dev = key[0]
        run(grid[0], g1, g2, driver.active.get_current_stream(dev), function, packed, None, None, None,
            *args, *tail)
        return None

    def _first(self, key, grid, args: tuple, meta: dict):
        """Triton's own launch (compiles on a cache miss); keeps what the direct path needs."""
        kernel = self.fn[grid](*args, **meta)
        names = self.fn.arg_names
        params = {k: v for k, v in meta.items() if k in names}
        bound = self.fn.signature.bind(*args, **params)
        bound.apply_defaults()
        values = tuple(bound.arguments.values())
        same = len(values) == len(names) and all(v is a for v, a in zip(values, args))
        if kernel is not None and same:
            if len(self._entries) >= L._MAX_PLANS:
                self._entries.clear()
            self._entries[key] = (kernel.run, kernel.function, kernel.packed_metadata, values[len(args):])
        return kernel


def direct(fn):
    """``fn`` (a launched ``@triton.jit`` kernel) as a :class:`DirectKernel`; ``fn`` itself under
    the interpreter (module docstring)."""
    return fn if L.INTERPRET else DirectKernel(fn)
