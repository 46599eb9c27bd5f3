"""The share of J*'s gain when there is no gain to share (task.alpha so large that J* = J(p_ref)):
found by tests/test_cli_fuzz.py's long run as a ZeroDivisionError in the final evaluation."""
import math

from rsm_fast.config import build_config
from rsm_fast.trainer import Trainer


def test_huge_alpha_reports_nan_share_instead_of_dividing_by_zero():
    tr = Trainer(build_config("rsm-soft-zo", overrides=["task.alpha=9223372036854775807", "train.epochs=1",
                                                        "train.batch_size=16"]))
    try:
        out = tr.evaluate(256)
    finally:
        tr.close()
    assert out["objective_target"] == out["objective_reference"]
    assert math.isnan(out["objective_gain"]) and math.isnan(out["objective_gain_marginal"])
    assert math.isfinite(out["reward_mean"])


def test_default_alpha_share_is_a_number():
    tr = Trainer(build_config("rsm-soft-zo", overrides=["train.epochs=1", "train.batch_size=16"]))
    try:
        out = tr.evaluate(256)
    finally:
        tr.close()
    assert out["objective_target"] > out["objective_reference"]
    assert math.isfinite(out["objective_gain"]) and out["objective_gain"] < 0.1     # untrained: ~0
