"""The 2-D estimator study (rsm_fast.study, bench/estimator_study.py; spec §4, §8.4-8.6).

Small, seeded, float64 Monte-Carlo checks on 4 fixed points at t=389 with the exact optimal policy.
Tolerances are derived from the measured standard errors (4 SE), so a biased estimator fails.
"""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from rsm_fast import study as ST

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def proto():
    return ST.make_protocol("target")


@pytest.fixture(scope="module")
def pts(proto):
    """4 fixed points, Psi*, and the hard truth (2^13 pathwise samples/point) with its SE."""
    x = ST.fixed_points(proto, 4, seed=0)
    hard, hard_se = ST.pathwise_samples(proto, x, 2**13, _gen(100))
    return dict(x=x, psi=proto.task.psi_star(x, proto.alpha_bar), hard=hard, hard_se=hard_se)


def _repeat_mean(est, P, R):
    """[P*R, 2] (row = p*R + r) -> per-point mean and its standard error over the R repeats."""
    e = est.reshape(P, R, 2)
    return e.mean(1), e.std(1) / math.sqrt(R)


@pytest.fixture(scope="module")
def zo_big(proto, pts):
    """ZO full rollout: 16 independent estimates of n=1024 children per point (same rollouts for
    none/mean/loo/soft)."""
    R = 16
    est, nfe = ST.zo_full(proto, pts["x"].repeat_interleave(R, 0), 1024, _gen(200))
    return {k: _repeat_mean(v, 4, R) for k, v in est.items()}, nfe


def test_protocol_matches_spec(proto):
    assert proto.t_at(proto.step) == 389 and proto.n_steps == 39
    assert proto.alpha_bar == pytest.approx(0.009848, abs=1e-6)          # spec §8.4
    assert proto.sigma == pytest.approx(0.45627, abs=1e-5)                # spec §8.5
    assert proto.b == pytest.approx(0.23465, abs=1e-5)
    assert proto.Sigma / proto.b == pytest.approx(0.8872, abs=1e-4)
    assert [proto.t_at(proto.stop_step(d)) for d in ("1step", "0.9", "0.8", "0.5")] == [379, 349, 309, 189]
    assert proto.stop_step("full") is None
    assert [proto.t_at(s) for s in ST.split_steps(proto, 4)] == [389, 289, 189, 89]
    with pytest.raises(ValueError, match="policy"):
        ST.make_protocol("optimal")


def test_hard_truth_is_precise_and_shrunk_relative_to_psi_star(pts):
    """Spec §8.6: the hard value gradient under the optimal policy is ~0.4-0.7 x Psi* on x1."""
    assert float(pts["hard_se"].max()) < 0.01
    ratio = pts["hard"][:, 0] / pts["psi"][:, 0]
    assert 0.4 < float(ratio.mean()) < 0.7
    assert float(ratio.max()) < 0.85
    gap = (pts["hard"] - pts["psi"]).abs()
    assert float(gap[:, 0].min()) > 5 * float(pts["hard_se"][:, 0].max())     # biased vs Psi*, clearly


def _pooled(err, se):
    """Mean over points of a per-point error [P, 2] and its standard error."""
    return err.mean(0), (se**2).sum(0).sqrt() / err.shape[0]


def test_zo_full_rollout_is_unbiased_for_the_hard_truth(pts, zo_big):
    est, _ = zo_big
    for name in ("zo_full_loo", "zo_full_none"):
        mean, se = est[name]
        tot = torch.sqrt(se**2 + pts["hard_se"] ** 2)
        assert bool(((mean - pts["hard"]).abs() <= 4.5 * tot).all()), (name, mean, pts["hard"], tot)
        perr, pse = _pooled(mean - pts["hard"], tot)
        assert bool((perr.abs() <= 4 * pse).all()), (name, perr, pse)
    # the test has power: the pooled tolerance is well below the (hard - Psi*) gap on x1
    mean, se = est["zo_full_loo"]
    gap = (pts["hard"] - pts["psi"])[:, 0].abs().mean()
    assert 4 * float(_pooled(mean - pts["hard"], se)[1][0]) < 0.5 * float(gap)


def test_soft_zo_matches_psi_star_hard_zo_does_not(pts, zo_big):
    """Spec §4.3 / §8.6: the entropy-augmented return makes ZO consistent for Psi* (to ~0.01
    discretisation); the hard return is shrunk toward 0 on the reward direction."""
    est, _ = zo_big
    soft, se = est["zo_soft"]
    assert bool(((soft - pts["psi"]).abs() <= 4 * se + 0.01).all()), (soft, pts["psi"], se)
    perr, pse = _pooled(soft - pts["psi"], se)
    assert bool((perr.abs() <= 4 * pse + 0.01).all()), (perr, pse)
    hard, hse = est["zo_full_loo"]
    perr, pse = _pooled(hard - pts["psi"], hse)
    assert float(perr[0]) > 4 * float(pse[0]) + 0.01                      # psi_x1 < hard_x1 < 0
    assert 0.35 < float((hard[:, 0] / pts["psi"][:, 0]).mean()) < 0.75


def test_centering_lowers_rmse_at_equal_samples(proto, pts):
    R, n = 32, 16
    est, _ = ST.zo_full(proto, pts["x"].repeat_interleave(R, 0), n, _gen(300))
    truth = pts["hard"].repeat_interleave(R, 0)
    rm = {k: ST.rmse_stats(est[f"zo_full_{k}"], truth)[0] for k in ("none", "mean", "loo")}
    assert rm["mean"] < 0.35 * rm["none"]
    assert rm["loo"] < 0.35 * rm["none"]


def test_zo_rmse_falls_like_one_over_sqrt_n(proto, pts):
    R = 8
    xg = pts["x"].repeat_interleave(R, 0)
    truth = pts["hard"].repeat_interleave(R, 0)
    curve = {}
    for m in (4, 6, 8, 10):
        est, _ = ST.zo_full(proto, xg, 2**m, _gen(400 + m))
        curve[m] = ST.rmse_stats(est["zo_full_loo"], truth)[0]
    slope = ST.loglog_slope(curve)
    assert -0.65 < slope < -0.35, curve


def test_one_step_fo_lookahead_bias(proto, pts):
    """Biased vs Psi* by far more than its standard error; vs the hard truth only at the
    discretisation level (linear reward + exact Tweedie: r(x0_hat) is the exact hard value)."""
    R = 4
    est, nfe = ST.fo_depth(proto, pts["x"].repeat_interleave(R, 0), 256, "1step", _gen(500))
    assert nfe == 1 + 256                           # the parent, then the Tweedie of each child
    mean, se = _repeat_mean(est, 4, R)
    bias_psi = (mean - pts["psi"]).abs()
    assert float(bias_psi[:, 0].min()) > 10 * float(se.max())
    bias_hard = (mean - pts["hard"]).abs()
    assert float(bias_hard.max()) < 0.25 * float(bias_psi[:, 0].min())
    assert float(bias_hard.max()) < 4 * float(pts["hard_se"].max()) + 0.006


def test_is_under_reference_matches_psi_star(pts):
    """Spec §8.6: self-normalised IS with e^{r/alpha} weights under reference rollouts ~ Psi*."""
    ref = ST.make_protocol("reference")
    R = 16
    est = ST.is_reference(ref, pts["x"].repeat_interleave(R, 0), 1024, _gen(600))
    mean, se = _repeat_mean(est, 4, R)
    assert bool(((mean - pts["psi"]).abs() <= 4 * se + 0.01).all()), (mean, pts["psi"], se)
    with pytest.raises(ValueError, match="reference"):
        ST.is_reference(ST.make_protocol("target"), pts["x"], 8, _gen(0))


def test_branch_tree_nfe_and_single_branch_equals_plain_zo(proto, pts):
    x = pts["x"][:1]
    est11, nfe11 = ST.branch_tree(proto, x, 16, 1, 1, _gen(7))
    plain, nfe_plain = ST.zo_depth(proto, x, 16, "full", _gen(7))
    torch.testing.assert_close(est11, plain, rtol=0, atol=1e-12)
    assert nfe11 == 16 + 16 * 38 and nfe_plain == 1 + 16 * 38
    # (2,2): 4 trees; split at 389 (4 evals), 2 nodes x 19 steps to t=189, split (8), 4 nodes x 18 steps
    _, nfe22 = ST.branch_tree(proto, x, 16, 2, 2, _gen(7))
    assert nfe22 == 4 * (1 + 2 * 19 + 2 + 4 * 18)


def test_branch_tree_is_unbiased_for_the_hard_truth(proto, pts):
    R = 16
    est, _ = ST.branch_tree(proto, pts["x"].repeat_interleave(R, 0), 256, 2, 2, _gen(800))
    err = est.reshape(4, R, 2) - pts["hard"][:, None]
    z = err.mean((0, 1)) / (err.reshape(-1, 2).std(0) / math.sqrt(4 * R))
    assert bool((z.abs() < 4).all()), z
    assert float(pts["hard"][:, 0].abs().mean()) > 4 * float(err[..., 0].std() / math.sqrt(4 * R))   # power


def test_tempflow_estimates_the_ode_continuation_target(proto, pts):
    ode, ode_se = ST.pathwise_samples(proto, pts["x"], 2**12, _gen(900), ode=True)
    R = 16
    est, _ = ST.tempflow(proto, pts["x"].repeat_interleave(R, 0), 256, _gen(901))
    mean, se = _repeat_mean(est, 4, R)
    assert bool(((mean - ode).abs() <= 4 * torch.sqrt(se**2 + ode_se**2) + 0.002).all()), (mean, ode, se, ode_se)
    assert float((ode - pts["hard"]).abs().max()) > 0.1          # a different control problem (spec §4.4)


def test_truncated_tempflow_costs_d_plus_one_and_reads_the_tweedie_value(proto, pts):
    """Truncated branches (issue 20 item 6): the ODE continuation cut after d steps costs d + 1
    forwards per child; with no ODE step (1step) the Tweedie read of this linear reward is the hard
    value, not TempFlow's ODE target: the truncation changes the estimand, measured here."""
    R, n = 16, 256
    est, nfe = ST.zo_depth(proto, pts["x"].repeat_interleave(R, 0), n, "1step", _gen(902), baseline="mean",
                           stochastic=False)
    assert nfe == 1 + n
    mean, se = _repeat_mean(est, 4, R)
    assert bool(((mean - pts["hard"]).abs() <= 4 * torch.sqrt(se**2 + pts["hard_se"]**2) + 0.01).all())
    _, nfe3 = ST.zo_depth(proto, pts["x"][:1], 8, "0.9", _gen(903), baseline="mean", stochastic=False)
    assert proto.stop_step("0.9") - proto.step - 1 == 3 and nfe3 == 1 + 8 * (3 + 1)


def test_solver_continuation_euler_is_tempflow_and_dpm2_is_closer_on_a_coarse_grid(proto, pts):
    """Higher-order continuation (issue 20 item 6): euler at stride 1 is TempFlow's DDIM ODE
    continuation (same children, same estimate to float64 rounding, same NFE); at stride k the
    continuation costs ceil(38/k) forwards, and on the same children a second-order solver moves the
    estimate less from the fine-grid one than euler on the same coarse grid."""
    x = pts["x"].repeat_interleave(4, 0)
    fine, nfe = ST.tempflow(proto, x, 64, _gen(904))
    same, nfe1 = ST.tempflow_solver(proto, x, 64, _gen(904), "euler", 1)
    assert nfe1 == nfe == 1 + 64 * 38
    assert float((same - fine).abs().max()) < 1e-12
    dev = {}
    for sv in ("euler", "dpm2"):
        est, nfe8 = ST.tempflow_solver(proto, x, 64, _gen(904), sv, 8)
        assert nfe8 == 1 + 64 * math.ceil(38 / 8)
        dev[sv] = float((est - fine).pow(2).mean().sqrt())
    assert dev["dpm2"] < 0.5 * dev["euler"], dev


def test_study_driver_and_cli_smoke(tmp_path):
    cfg = ST.StudyConfig(points=2, min_log2=4, max_log2=5, gt_log2=8, ode_gt_log2=8)
    a = ST.run_study(cfg, log=lambda s: None)
    b = ST.run_study(cfg, log=lambda s: None)
    assert [r["rmse"] for r in a["rows"]] == [r["rmse"] for r in b["rows"]]          # seeded
    n_est = 1 + 5 + 4 + 4 + 5 + 1 + 4 + len(ST.SOLVER_CONTS)   # fo_cs, fo depths, zo_full x3 + soft, zo
    #   depths, branches, tempflow, tempflow truncated at the four lookahead depths, and its solver continuations
    assert len(a["rows"]) == n_est * 3 * 2
    assert len(ST.evaluate_claims(a)) == 4
    spec = importlib.util.spec_from_file_location("estimator_study", ROOT / "bench" / "estimator_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--out", str(tmp_path), "--points", "2", "--min-log2", "4", "--max-log2", "4",
                     "--gt-log2", "8", "--ode-gt-log2", "8", "--no-plot"]) == 0
    md = (tmp_path / "estimator_study_toy2d.md").read_text()
    assert "What the paper reports vs what we measured" in md and md.count("**(") == 4
    lines = (tmp_path / "estimator_study_toy2d.csv").read_text().strip().splitlines()
    assert lines[0].startswith("estimator,family,truth") and len(lines) == 1 + n_est * 3
    assert not (tmp_path / "estimator_study_toy2d.png").exists()
