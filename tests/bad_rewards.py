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
