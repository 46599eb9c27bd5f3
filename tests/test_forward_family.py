"""The forward-process family as presets of the one trainer (issue 19): ``diffusion-nft`` and
``awm`` train the 2-D task toward the analytic optimum and the digits tasks (held-out reward up,
KL reported), a tiny SD3 end to end with a LoRA that diffusers loads; an epoch's NFE are exactly
rows x steps (rollout), rows x trained steps (train) and one such set per no-grad evaluation
(reference); the solver grid of every task equals its transition's; VP models train in exact
rectified-flow coordinates; bad settings are one-line config errors naming the field."""
from __future__ import annotations

import pytest
import torch

from rsm_fast import solvers as SV
from rsm_fast.config import ConfigError, build_config
from rsm_fast.forward_family import grid_from_transition
from rsm_fast.trainer import Trainer

TOY = ["train.threads=1", "task.eval_samples=2048"]


@pytest.mark.parametrize("preset", ["diffusion-nft", "awm"])
def test_presets_train_the_2d_task_toward_the_optimum(preset):
    tr = Trainer(build_config(preset, None, TOY + ["train.epochs=60"]))
    before = tr.evaluate()
    logs = [tr.epoch() for _ in range(60)]
    after = tr.evaluate()
    target = after["reward_target"]
    assert before["reward_mean"] < after["reward_mean"] < target + 0.3        # toward, not past, the optimum
    assert after["distance_to_target"] < 0.75 * before["distance_to_target"]
    assert all(x["kl"] >= 0 for x in logs) and logs[-1]["kl"] > logs[0]["kl"]


@pytest.mark.parametrize("preset", ["diffusion-nft", "awm"])
def test_epoch_nfe_is_exact(preset):
    cfg = build_config(preset, None, TOY + ["train.batch_size=32", "method.group_size=8"])
    tr = Trainer(cfg)
    out = tr.epoch()
    N, B = cfg.task.num_steps, 32
    S = int(N * cfg.method.fp_fraction) if preset == "diffusion-nft" else cfg.method.fp_timesteps
    evals = (cfg.method.fp_kl > 0) + (preset == "diffusion-nft" or cfg.method.fp_ema_kl > 0)
    assert out["nfe_epoch"] == {"rollout": B * N, "reference": B * S * evals, "train": B * S, "eval": 0}
    assert out["records"] == B * S


@pytest.mark.parametrize("task", ["toy2d", "digits-ddim", "digits-flow"])
def test_solver_grid_is_the_tasks_own(task):
    sets = [f"task.name={task}", "task.num_steps=6"] + (["task.condition=none"] if task != "toy2d" else [])
    tr = Trainer(build_config("diffusion-nft", None, sets + ["train.batch_size=16", "method.group_size=4"]))
    trans, grid = tr.task.transition, grid_from_transition(tr.task.transition)
    assert grid.num_steps == trans.num_steps and torch.equal(grid.model_t, trans.table("t"))
    torch.testing.assert_close(grid.alpha[:-1], trans.table("alpha"), rtol=0, atol=1e-15)
    torch.testing.assert_close(grid.sigma[:-1], trans.table("sigma_t"), rtol=0, atol=1e-15)
    # the Euler solver on this grid is the task's own deterministic (ODE) step
    plan = SV.make_plan("euler", trans.native, grid)
    c = trans.coeffs(torch.arange(trans.num_steps), torch.zeros(trans.num_steps, dtype=torch.bool),
                     dtype=torch.float64)
    x, f = torch.randn(trans.num_steps, 3, dtype=torch.float64), torch.randn(trans.num_steps, 3, dtype=torch.float64)
    for i in range(trans.num_steps):
        ours = SV.step(plan, i, x[i:i + 1], f[i:i + 1], ())[0]
        torch.testing.assert_close(ours, c.c_x[i] * x[i:i + 1] + c.c_f[i] * f[i:i + 1], rtol=1e-10, atol=1e-12)


def test_vp_rows_are_exact_rectified_flow_rows():
    """A VP row ``alpha x0 + sigma eps`` scaled by 1/(alpha + sigma) is the flow row at
    t = sigma/(alpha + sigma), and the true epsilon's velocity is the flow target eps - x0."""
    tr = Trainer(build_config("awm", None, TOY + ["train.batch_size=16", "method.group_size=4"]))
    fam = tr.family
    x0 = torch.randn(16, 2, dtype=torch.float64)
    adv = torch.zeros(16, dtype=torch.float64)
    tr.conds = tr.task.conditions(tr._spec.groups, tr.gen)
    rows = fam._rows(x0, adv)
    t = rows["t_rf"].double().unsqueeze(1)
    torch.testing.assert_close(rows["x_rf"].double(), (1 - t) * rows["x0"].double() + t * rows["eps"].double(),
                               rtol=1e-5, atol=1e-5)
    v = fam._velocity(rows["eps"], rows)       # the exact epsilon as the model output
    torch.testing.assert_close(v.double(), (rows["eps"] - rows["x0"]).double(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset", ["diffusion-nft", "awm"])
@pytest.mark.parametrize("task", ["digits-ddim", "digits-flow"])
def test_presets_train_digits(preset, task):
    sets = [f"task.name={task}", "task.condition=none", "task.reward=digit_logprob:3", "task.num_steps=6",
            "train.batch_size=32", "method.group_size=8", "task.eval_samples=64", "train.threads=1",
            "train.lr=0.003", f"method.fp_kl={0.03 if preset == 'awm' else 0.3}"]
    tr = Trainer(build_config(preset, None, sets))
    before = tr.evaluate()
    for _ in range(8):
        out = tr.epoch()
    after = tr.evaluate()
    assert after["reward_mean"] > before["reward_mean"]
    assert after["kl_to_reference"] > 0 and out["kl"] > 0


@pytest.mark.parametrize("preset", ["diffusion-nft", "awm"])
def test_tiny_sd3_lora_trains_and_loads_in_diffusers(tmp_path, preset):
    pytest.importorskip("diffusers")
    from rsm_fast.models import build_model
    from rsm_fast.runlog import RunDir

    cfg = build_config(preset, None, ["task.name=diffusers", "task.model=sd3-tiny", "task.num_steps=4",
                                      "train.batch_size=4", "method.group_size=2", "task.eval_samples=2",
                                      "train.threads=1", "train.epochs=2", "train.lr=0.01", "policy.lora_rank=4",
                                      "task.reward=brightness"])
    tr = Trainer(cfg)
    assert tr.task.cfg_scale is None                      # CFG-free by default
    s = tr.run(RunDir(tmp_path / "run"), progress=False)
    assert s["epochs"] == 2 and s["nfe_by_kind"]["rollout"] == 2 * 4 * 4
    pipe = build_model("sd3-tiny", seed=0).pipeline()
    pipe.load_lora_weights(s["lora"])
    a = tr.task.adapter
    x = torch.randn(2, *tr.task.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.7, 0.4])
    cond = a.encode_prompts(["a photo of a cat", "a bowl of fruit"])
    with torch.no_grad():
        ours, base = a.policy(x, t, cond), a.reference(x, t, cond)
        theirs = a._denoise(pipe.transformer, x, t, cond).float()
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (ours - base).abs().max() > 1e-6


@pytest.mark.parametrize("sets, field", [
    (["rollout.plan=branch", "rollout.k=[2,0,0,0,0,0,0,0,0,0]"], "method.estimator"),
    (["rollout.waves=2"], "rollout.waves"),
    (["train.parallel=fsdp"], "train.parallel"),
    (["method.group_size=1"], "method.group_size"),
    (["method.fp_fraction=0.05"], "method.fp_fraction"),
    (["rollout.solver=heun"], "rollout.solver"),
    (["method.fp_loss=ppo"], "method.fp_loss"),
])
def test_bad_forward_settings_are_config_errors(sets, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build_config("diffusion-nft", None, TOY + sets)


@pytest.mark.parametrize("preset", ["diffusion-nft", "awm"])
def test_killed_forward_run_resumes_to_the_uninterrupted_run(tmp_path, preset):
    """SIGKILL after the third update, ``--resume``: weights, the shadow (old / EMA) weights and the
    log equal the uninterrupted run bit for bit."""
    import json

    from test_resume import _args, cli, log_records

    args = _args(["--preset", preset, "train.epochs=5", "train.checkpoint_every=2", "train.batch_size=64",
                  "method.group_size=8", "task.eval_samples=256"])
    ref = cli(tmp_path, "--out", "ref", *args)
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = cli(tmp_path, "--out", "run", *args, fault="after-epoch:3")
    assert killed.returncode == -9, killed.stderr[-2000:]
    done = cli(tmp_path, "--resume", "run")
    assert done.returncode == 0, done.stderr[-2000:]
    assert log_records(tmp_path / "ref") == log_records(tmp_path / "run")
    ca, cb = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("ref", "run"))
    assert all(torch.equal(ca["policy"][k], cb["policy"][k]) for k in ca["policy"])
    assert all(torch.equal(x, y) for x, y in zip(ca["forward"]["shadow"], cb["forward"]["shadow"]))
    sa, sb = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("ref", "run"))
    sa.pop("seconds"), sb.pop("seconds")
    assert sa == sb


def test_memory_estimate_counts_the_shadow_weights():
    """The pre-flight estimate adds the shadow (old / EMA) weights and the copy their in-place
    evaluation keeps: twice the trained parameters' bytes."""
    from rsm_fast import memory_profile as MP
    from rsm_fast import preflight as P

    sets = ["task.name=digits-flow", "task.condition=none", "policy.lora_rank=0", "task.num_steps=10",
            "train.batch_size=16", "method.group_size=8"]
    est = {}
    for preset in ("grpo", "diffusion-nft"):
        cfg = build_config(preset, None, sets)
        geo = MP.image_geometry(cfg, P.task_geometry(cfg))
        est[preset] = P.estimate_memory(cfg, geo).params
    assert est["diffusion-nft"] - est["grpo"] == 2 * geo.param_bytes > 0


def test_a_new_family_is_one_class_and_one_registry_line(monkeypatch):
    """The trainer's loop runs any family that implements rsm_fast/families.py's interface: here a
    minimal one (reward-weighted regression of the policy's output at x_T toward 0) registered in
    place of ``zo``, with the loop's accounting (NFE, clocks, checkpoints) unchanged."""
    from rsm_fast import families as F

    class Shrink(F.TrajectoryFamily):
        def rows(self, batch):
            rec = batch[0]
            return {"x": rec.x[:8], "t": self.tr._t_table.index_select(0, rec.step[:8]), "g": rec.group[:8]}

        def num_rows(self, rows):
            return 8

        def total_rows(self, rows):
            return 8

        def loss(self, rows, sl):
            f = self.tr._policy_out(rows["x"][sl], rows["t"][sl], rows["g"][sl])
            return f.pow(2).mean(), None

        def per_step(self, batch, rows, seconds):
            return {"custom": True}

    monkeypatch.setitem(F.FAMILIES, "zo", Shrink)
    tr = Trainer(build_config("grpo", None, TOY + ["train.batch_size=32", "method.group_size=8"]))
    before = [p.detach().clone() for p in tr.params]
    out = tr.epoch()
    assert out["custom"] and out["nfe_epoch"]["train"] == 8 * tr.cfg.train.inner_updates and out["records"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.params))
    assert tr.state_dict()["forward"] is None


@pytest.mark.parametrize("preset", ["diffusion-nft", "awm"])
def test_memory_estimate_counts_the_forward_rows(preset):
    """The preflight's records are the family's S noised rows per sample: the latents the rows
    really hold (x_t, eps, x_rf, x0, v_ref, shadow) fit in its per-record bytes."""
    from rsm_fast import preflight as P

    cfg = build_config(preset, None, TOY + ["train.batch_size=32", "method.group_size=8"])
    tr = Trainer(cfg)
    fam = tr.family
    fam.prepare()
    x0, r = fam.sample()
    rows = fam.rows((x0, r))
    real = sum(v.numel() * v.element_size() for v in rows.values() if isinstance(v, torch.Tensor) and v.dim() > 1)
    est = P.estimate_memory(cfg, P.task_geometry(cfg))
    assert P.plan_counts(cfg).records == rows["x_t"].shape[0]
    held = est.train["records"] + est.train["record copies"]
    assert real <= held <= 1.5 * real
