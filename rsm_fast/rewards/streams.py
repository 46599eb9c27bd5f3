"""Score rewards on their own CUDA stream so that scoring overlaps sampling (a no-op off CUDA).

Every kernel a thread launches goes to that thread's *current* stream, the device's default
stream unless another is made current. The sampler launches on the default stream, and so did an
in-process reward model on :class:`~.combine.AsyncReward`'s worker thread: both queued on one
stream, so the GPU ran them one after the other however the host threads interleaved.

:meth:`SideStream.run` runs a call on a stream of its own with the three orderings that needs:

1. producer -> side stream: the side stream waits for the work that wrote the inputs. With a
   :class:`Mark` (an event recorded on the producer's stream when the inputs were handed over,
   :meth:`SideStream.mark`; :class:`~.combine.AsyncReward` records it in ``submit``, on the
   sampling thread) it waits for exactly that; without one, for everything queued so far on the
   caller's current stream (``wait_stream``). A worker thread must use the mark: when it starts,
   the sampler has already queued the next wave's kernels on its stream, and ``wait_stream``
   would wait for those too -- serialising the two again.
2. memory: the inputs were allocated on the producer's stream and are read on the side stream;
   ``record_stream`` keeps the caching allocator from giving their memory to the producer's next
   allocation while the reward still reads it. The outputs, made on the side stream, are recorded
   on the consumer's stream the same way.
3. side stream -> consumer: an event recorded on the side stream after the call. The consumer's
   stream waits on it (``wait_event``: ordered on the GPU, no host sync), or with ``block=True``
   the calling thread waits (``Event.synchronize``) -- what a worker thread does before handing
   the result to another thread.

Off CUDA (``device`` None, ``cpu``, ``meta``) :meth:`SideStream.run` is ``fn(*args, **kwargs)``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor


class Mark(NamedTuple):
    """Inputs handed over by a producer: ``event`` recorded on its ``stream`` after they were written."""

    event: Any
    stream: Any


def record_stream(t: Tensor, stream) -> None:
    """``t.record_stream(stream)`` for a CUDA tensor (the caching allocator's cross-stream use mark)."""
    if t.device.type == "cuda":
        t.record_stream(stream)


def tensors_in(obj: Any) -> list[Tensor]:
    """The tensors in ``obj``: a tensor, or lists / tuples / dicts / dataclasses of them (nested)."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in tensors_in(o)]
    return []


def cuda_device(device) -> torch.device | None:
    """``device`` as a ``torch.device`` when it is a CUDA device, else None."""
    if device is None:
        return None
    d = torch.device(device)
    return d if d.type == "cuda" else None


class SideStream:
    """One CUDA stream for reward calls on ``device`` (nothing at all off CUDA); see the module docstring."""

    def __init__(self, device=None):
        self.device = cuda_device(device)
        self.stream = torch.cuda.Stream(device=self.device) if self.device is not None else None

    @property
    def active(self) -> bool:
        return self.stream is not None

    def mark(self) -> Mark | None:
        """On the producer's thread, after it wrote the inputs: an event on its current stream (None off CUDA)."""
        if not self.active:
            return None
        stream = torch.cuda.current_stream(self.device)
        event = torch.cuda.Event()
        event.record(stream)
        return Mark(event, stream)

    def run(self, fn: Callable, *args, inputs=(), after: Mark | None = None, consumer=None, block: bool = False,
            **kwargs):
        """``fn(*args, **kwargs)`` on the side stream, ordered after the inputs' producer and before the consumer.

        ``inputs``: tensors (or containers of them) the call reads that were made on the producer's
        stream. ``after``: the producer's :class:`Mark` (None: the caller's current stream is the
        producer). ``consumer``: the stream that will use the result (default: ``after.stream``,
        else the caller's current stream). ``block``: the calling thread waits for the side stream
        instead of the consumer's stream waiting on the GPU. Exceptions propagate after the same
        orderings.
        """
        if not self.active:
            return fn(*args, **kwargs)
        here = torch.cuda.current_stream(self.device)
        if consumer is None:
            consumer = after.stream if after is not None else here
        side = self.stream
        if after is not None:
            side.wait_event(after.event)
        else:
            side.wait_stream(here)
        for t in tensors_in(inputs):
            record_stream(t, side)
        try:
            with torch.cuda.stream(side):
                out = fn(*args, **kwargs)
        finally:
            done = torch.cuda.Event()
            done.record(side)
            if block:
                done.synchronize()
            else:
                consumer.wait_event(done)
        for t in tensors_in(out):
            record_stream(t, consumer)
        return out

    def __repr__(self) -> str:
        return f"SideStream({self.device})" if self.active else "SideStream(off)"
