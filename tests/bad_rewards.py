"""Deliberately broken rewards for the CLI error tests (importable as ``tests.bad_rewards:NAME``)."""
import torch


def nan_reward(x0):
    r = -0.5 * x0[:, 0]
    r[::7] = float("nan")
    return r


def wrong_shape_reward(x0):
    return -0.5 * x0          # [B, 2] instead of [B]


def not_a_tensor_reward(x0):
    return [1.0] * x0.shape[0]


def quadratic_reward(x0):
    """A valid differentiable non-built-in reward (no analytic target)."""
    return -(x0 ** 2).sum(1) * 0.1 + torch.zeros(())


def raising_reward(x0):
    """Fails inside the reward with a two-line message (the error must still be one line)."""
    raise RuntimeError("reward backend crashed\nsecond line of the traceback text")


def inf_reward(x0):
    r = x0.reshape(x0.shape[0], -1).mean(1)
    r[0] = float("inf")
    return r


def prompt_length_reward(images, prompts, metadata):
    """A valid three-argument reward: the prompt's length plus metadata['bonus']."""
    return torch.tensor([len(p) + m.get("bonus", 0.0) for p, m in zip(prompts, metadata)])


THREADS: list[str] = []


def thread_logging_linear(x0):
    """The 2-D task's linear reward as a non-built-in reward that records the thread it ran on."""
    import threading

    THREADS.append(threading.current_thread().name)
    return -0.5 * x0[:, 0] + 3.0


def system_exit_reward(x0):
    """Ends the process with status 0 if anything lets it through."""
    raise SystemExit(0)


def keyboard_interrupt_reward(x0):
    raise KeyboardInterrupt


def run_interrupted_reward(x0):
    """Raises the trainer's own stop signal (must never become a reward fault)."""
    import signal

    from rsm_fast.interrupts import RunInterrupted

    raise RunInterrupted(signal.SIGTERM)


class Stuck:
    """A reward that blocks until ``release`` is set (at most ``limit`` s), counting its calls.

    ``entered`` is set when a call starts, ``finished`` when one returns. Each test builds its own
    instance: an abandoned call is tracked per reward object.
    """

    differentiable = True

    def __init__(self, limit: float = 120.0, name: str = "stuck"):
        import threading

        self.name, self.limit = name, limit
        self.release, self.entered, self.finished = threading.Event(), threading.Event(), threading.Event()
        self.calls = 0
        self.threads: list[str] = []

    def __call__(self, images, prompts=None, metadata=None):
        import threading

        self.calls += 1
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        self.release.wait(self.limit)
        self.finished.set()
        return -0.5 * images.reshape(images.shape[0], -1)[:, 0]


def stuck_reward(x0):
    """Never returns in time (for CLI tests of task.reward_timeout); sleeps at most 60 s."""
    import time

    time.sleep(60)
    return -0.5 * x0[:, 0]
