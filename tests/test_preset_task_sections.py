"""Per-task preset defaults (issue 20 item 5): on an image model (``task.name=diffusers``, what
``--model`` selects) a preset that names a released method takes its release's settings -- clip
range, learning rate, batch per GPU, rows per rollout call, micro-batching, KL weight -- instead of
the 2-D task's; on the digits tasks every preset's own defaults fit in memory; ``--config`` and
``--set`` still win over the section; the toy values do not move.

The expected values below are transcribed from the released code named in each preset's comment
(repository @ commit, file), not read from the YAML, so a section that drifts from its source fails.
"""
from __future__ import annotations

from dataclasses import asdict

import pytest

import rsm_fast.config as C
from rsm_fast.config import build_config, preset_data, preset_names, split_preset
from rsm_fast.memory_estimate import estimate_memory, plan_counts, task_geometry

PRESETS = preset_names()
DIGITS = ("digits-ddim", "digits-flow")
IMAGE = ["task.name=diffusers", "task.model=sd15-tiny"]   # what `--model sd15-tiny` adds (rsm_fast/train.py)

# Presets with no diffusers section, and why: they name no released image method.
NO_DIFFUSERS = {
    "rsm-soft-zo": "rsm_fast's consistent soft zeroth-order estimator; the RSM paper leaves it as future "
                   "work and no code trains an image model with it",
    "rsm-soft-fo": "rsm_fast's pathwise soft first-order estimator (fo_value=path); no image release",
    "rsm-soft-fo-trap": "rsm-soft-fo read at both ends of each step (fo_path_rule=trapezoid); no image release",
}

# The release's image settings: {preset: {dotted key: value}}. Sources (see each preset's comment):
RELEASED = {
    # flow_grpo @ ac4c86e config/base.py (clip_range, learning_rate), config/grpo.py geneval_sd3
    # (24 images per prompt, global_std, beta 0.04)
    "grpo": {"method.clip_eps": 1e-4, "train.lr": 3e-4, "method.group_size": 24, "method.adv_norm": "global",
             "method.kl_coef": 0.04},
    "grpo-guard": {"method.clip_eps": 1e-4, "train.lr": 3e-4, "method.group_size": 24, "method.adv_norm": "global",
                   "method.kl_coef": 0.0},
    # ddpo-pytorch @ 1958463 config/base.py + config/dgx.py (8 x 4 images per GPU, buffer 16, no KL)
    "ddpo": {"method.clip_eps": 1e-4, "train.lr": 3e-4, "train.batch_size": 32, "method.group_size": 16,
             "rollout.chunk_size": 8, "method.kl_coef": 0.0, "method.adv_clip": 5.0},
    "reinforce": {"train.lr": 3e-4, "train.batch_size": 32, "rollout.chunk_size": 8},
    # RSM code @ e8be3df sd15_zeroth_order/configs/train/hpsv2_1_lora_grpo.yaml (8 x 16 per GPU)
    "pcpo": {"method.clip_eps": 1e-4, "train.lr": 3e-4, "train.batch_size": 128, "method.group_size": 16,
             "rollout.chunk_size": 8, "method.kl_coef": 0.0},
    "pcpo-reweight": {"method.clip_eps": 1e-4, "train.lr": 3e-4, "train.batch_size": 128, "method.group_size": 16,
                      "rollout.chunk_size": 8, "method.kl_coef": 0.0},
    # RSM code sd35_zeroth_order/config/sd3_matrix.py default sampler (+ base.py, sd3_reward_presets.py)
    "pcpo-reweight-flow": {"method.clip_eps": 1e-4, "train.lr": 3e-4, "task.num_steps": 10,
                           "train.timestep_fraction": 0.99, "method.adv_norm": "global", "method.kl_coef": 0.01,
                           "method.kl_dt_weight": True, "method.group_size": 24, "train.batch_size": 192,
                           "rollout.chunk_size": 32},
    # MixGRPO @ e5cdd6a scripts/finetune/finetune_flux_grpo_MixGRPO.sh
    "mix-grpo": {"method.clip_eps": 1e-4, "train.lr": 1e-5, "method.kl_coef": 0.0, "method.group_size": 12,
                 "train.batch_size": 12, "rollout.chunk_size": 1, "rollout.window": 4, "rollout.window_every": 25,
                 "task.num_steps": 25},
    # BranchGRPO @ 19fbb9f scripts/finetune/finetune_flux_branchgrpo_8gpus.sh
    "branch-grpo": {"method.clip_eps": 1e-3, "train.lr": 1e-5, "method.kl_coef": 0.0, "train.batch_size": 2,
                    "task.num_steps": 20},
    # TempFlow-GRPO keeps flow_grpo's config/base.py; 8 trunks in groups of 4 seeds
    **{p: {"method.clip_eps": 1e-4, "train.lr": 3e-4, "train.batch_size": 8, "method.group_size": 4,
           "rollout.chunk_size": 8, "method.kl_coef": 0.04}
       for p in ("tempflow-grpo", "tempflow-grpo-rsm", "tempflow-grpo-k1", "tempflow-evr", "tempflow-evr-cost",
                 "tempflow-evr-k1", "rsm-evr", "rsm-evr-cost")},
    # RSM code sd3_matrix.py branch sampler: base2 (16 x 4 on 2 GPUs), lowsnr2 GenEval (48 x 4 on 4 GPUs)
    "rsm-uniform-realloc": {"method.clip_eps": 1e-4, "train.lr": 3e-4, "train.batch_size": 32, "method.group_size": 4,
                            "rollout.chunk_size": 12, "method.kl_coef": 0.01, "method.kl_dt_weight": True},
    "rsm-lowsnr": {"method.clip_eps": 1e-4, "train.lr": 3e-4, "train.batch_size": 48, "method.group_size": 4,
                   "rollout.chunk_size": 12, "method.kl_coef": 0.004, "method.kl_dt_weight": False},
    # RSM code sd15_zeroth_order/configs/train/base_grpo_pr_uwsigma_lora10.yaml (8 x 5 per GPU)
    "rsm-sparse": {"method.clip_eps": 1e-4, "train.lr": 3e-4, "train.batch_size": 40, "method.group_size": 5,
                   "rollout.chunk_size": 2, "method.kl_coef": 0.0, "task.num_steps": 50},
    # DiffusionNFT @ 24af555 config/nft.py sd3_geneval; AWM @ be51372 config/dgx_awm.py geneval_sd3_no_cfg_1node
    "diffusion-nft": {"method.fp_kl": 1e-4, "train.lr": 3e-4, "method.group_size": 24, "method.adv_norm": "global",
                      "train.batch_size": 144, "rollout.chunk_size": 9, "train.inner_updates": 1},
    "awm": {"method.fp_kl": 1e-3, "train.lr": 3e-4, "method.group_size": 24, "method.adv_norm": "global",
            "train.batch_size": 216, "rollout.chunk_size": 6, "method.fp_clip": 1.0, "method.fp_ema_kl": 1.0,
            "train.inner_updates": 1},
    # SQDF @ 68861b2 T2I/aesthetic.sh (sqdf_alpha 2.0: C1 x alpha, K = 1/alpha), config default lr 1e-3
    "sqdf": {"method.fo_c1_scale": 2.0, "method.fo_reward_scale": 0.5, "train.lr": 1e-3, "train.batch_size": 32,
             "rollout.chunk_size": 4, "method.fo_discount": 0.9},
    # nabla-gfn @ 6b74d4c config/default_config.py
    "residual-nabla-db": {"method.fo_reward_scale": 1e3, "method.trust_eps": 1e3, "train.lr": 1e-3,
                          "train.batch_size": 64, "rollout.chunk_size": 16, "train.inner_updates": 2},
    # RSM code sd35_first_order/config/default_config.py (pruned VGG-Flow)
    "vgg-flow": {"method.fo_reward_scale": 3e7, "train.lr": 5e-4, "task.num_steps": 20, "train.batch_size": 8,
                 "rollout.chunk_size": 8},
    # RSM code sd15_first_order/config/simple_res-nabladb_sd_hps_usez0_basesnr.yaml (the redesign)
    "rsm-fo-terminal": {"method.fo_reward_scale": 5e5, "train.lr": 4e-3, "train.batch_size": 64,
                        "rollout.chunk_size": 8, "train.inner_updates": 2},
}

# Records per training micro-batch in the release (one backward): train.grad_accum is set so that
# records / grad_accum equals it, on the release's schedule (every step of an image model is noisy).
MICRO = {
    "ddpo": 4, "reinforce": 4,                  # DDPO train.batch_size 4 at one timestep
    "pcpo": 4, "pcpo-reweight": 4,              # train_batch_size 4
    "pcpo-reweight-flow": 32,                   # sd3_matrix default sampler train.batch_size 32
    "grpo": 50, "grpo-guard": 50,               # one trajectory's records (grpo.yaml's convention)
    "mix-grpo": 1, "branch-grpo": 1,            # one record per loss.backward()
    "diffusion-nft": 9,                         # train.batch_size 9 at one timestep
    "awm": 18,                                  # train.batch_size 3 x 6 timesteps
    "rsm-uniform-realloc": 12, "rsm-lowsnr": 12,  # latent_chunk_size 12
    "rsm-sparse": 4,                            # policy_update_row_batch_size 4
    "sqdf": 4, "residual-nabla-db": 4, "vgg-flow": 4,
    "rsm-fo-terminal": 1,
    **{p: 54 for p in ("tempflow-grpo", "tempflow-grpo-rsm", "tempflow-evr", "tempflow-evr-cost", "rsm-evr",
                       "rsm-evr-cost")},        # one trunk: 6 branches x 9 steps
    "tempflow-grpo-k1": 9, "tempflow-evr-k1": 9,
}

# The toy (2-D) values every preset had before the per-task sections: they must not move.
TOY_KEYS = ("method.clip_eps", "train.lr", "train.batch_size", "method.group_size", "task.num_steps",
            "method.kl_coef", "rollout.chunk_size", "train.grad_accum")
TOY = {
    "awm": (1e-4, 2e-3, 512, 16, 14, 0.0), "branch-grpo": (1e-2, 2e-3, 32, 1, 20, 0.04),
    "ddpo": (1e-2, 2e-3, 512, 16, 50, 0.0), "diffusion-nft": (1e-4, 2e-3, 512, 16, 10, 0.0),
    "grpo": (1e-2, 2e-3, 512, 16, 50, 0.04), "grpo-guard": (1e-2, 2e-3, 512, 16, 50, 0.0),
    "mix-grpo": (1e-2, 2e-3, 512, 16, 25, 0.0), "pcpo": (1e-2, 2e-3, 512, 16, 50, 0.04),
    "pcpo-reweight": (1e-2, 2e-3, 512, 16, 50, 0.04), "pcpo-reweight-flow": (1e-2, 2e-3, 512, 16, 50, 0.04),
    "reinforce": (1e-4, 2e-3, 512, 16, 50, 0.1), "residual-nabla-db": (1e-4, 5e-3, 512, 16, 50, 0.0),
    "rsm-evr": (1e-2, 2e-3, 64, 4, 10, 0.04), "rsm-evr-cost": (1e-2, 2e-3, 64, 4, 10, 0.04),
    "rsm-fo-terminal": (1e-4, 2e-3, 512, 16, 50, 0.0), "rsm-lowsnr": (1e-2, 2e-3, 64, 4, 10, 0.004),
    "rsm-soft-fo": (1e-4, 1e-2, 512, 16, 50, 0.0), "rsm-soft-fo-trap": (1e-4, 1e-2, 512, 16, 50, 0.0),
    "rsm-soft-zo": (1e-4, 1e-2, 512, 0, 50, 1.0),
    "rsm-sparse": (1e-2, 2e-3, 40, 5, 50, 0.04), "rsm-uniform-realloc": (1e-2, 2e-3, 64, 4, 10, 0.04),
    "sqdf": (1e-4, 5e-3, 512, 16, 50, 0.0), "tempflow-evr": (1e-2, 2e-3, 64, 4, 10, 0.04),
    "tempflow-evr-cost": (1e-2, 2e-3, 64, 4, 10, 0.04), "tempflow-evr-k1": (1e-2, 2e-3, 256, 16, 10, 0.04),
    "tempflow-grpo": (1e-2, 2e-3, 64, 4, 10, 0.04), "tempflow-grpo-k1": (1e-2, 2e-3, 256, 16, 10, 0.04),
    "tempflow-grpo-rsm": (1e-2, 2e-3, 64, 4, 10, 0.04), "vgg-flow": (1e-4, 5e-3, 512, 16, 50, 0.0),
}

# Keys a digits section may set: sizes and the step size, never the method (grpo's digits-flow
# section is the exception: it carries flow_grpo's released loss, tests/test_presets_released.py).
DIGITS_KEYS = {"task.num_steps", "method.group_size", "train.batch_size", "train.lr", "train.grad_accum",
               "rollout.chunk_size"}
DIGITS_LIMIT = 4 * 2**30      # bytes; every preset estimates <= 2.1 GB with its own digits defaults


def _get(cfg, key):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _sections(preset: str) -> dict:
    return split_preset(preset, preset_data(preset))[1]


def _leaves(section: dict) -> dict:
    return {f"{s}.{k}": v for s, fields in section.items() for k, v in fields.items()}


def _without_task_sections(monkeypatch):
    real = C.preset_data
    monkeypatch.setattr(C, "preset_data", lambda name: {k: v for k, v in real(name).items() if k != "tasks"})


def test_every_preset_has_a_diffusers_section_or_a_reason():
    assert set(RELEASED) | set(NO_DIFFUSERS) == set(PRESETS), "a preset is on neither list"
    assert not set(RELEASED) & set(NO_DIFFUSERS)
    for name in PRESETS:
        has = "diffusers" in _sections(name)
        assert has == (name not in NO_DIFFUSERS), name
        assert name not in NO_DIFFUSERS or len(NO_DIFFUSERS[name]) > 20


@pytest.mark.parametrize("preset", sorted(RELEASED))
@pytest.mark.parametrize("model", ["sd15-tiny", "sd3-tiny"])
def test_image_runs_take_the_release_settings(preset, model):
    cfg = build_config(preset, None, ["task.name=diffusers", f"task.model={model}"])
    for key, want in RELEASED[preset].items():
        got = _get(cfg, key)
        assert got == (pytest.approx(want, rel=1e-12) if isinstance(want, float) else want), (preset, key, got)
    toy = build_config(preset)
    # the 2-D learning rate is never an image run's, and no ratio / hinge surrogate keeps the toy's clip
    assert cfg.train.lr != toy.train.lr
    if cfg.method.estimator == "zo" and cfg.method.surrogate in ("ratio", "hinge"):
        assert toy.method.clip_eps == 0.01 and cfg.method.clip_eps <= 1e-3
    # no image run trains a whole epoch in one forward any more
    assert cfg.train.grad_accum > 1


@pytest.mark.parametrize("preset", sorted(MICRO))
def test_micro_batches_are_the_releases(preset):
    cfg = build_config(preset, None, IMAGE)
    N = cfg.task.num_steps
    records = plan_counts(cfg, (True,) * N, budgeted=False).records
    assert records % cfg.train.grad_accum == 0
    assert records // cfg.train.grad_accum == MICRO[preset], (records, cfg.train.grad_accum)
    assert cfg.rollout.chunk_size == RELEASED[preset].get("rollout.chunk_size", cfg.rollout.chunk_size)


@pytest.mark.parametrize("preset", PRESETS)
def test_toy_values_do_not_move(preset):
    cfg = build_config(preset)
    assert cfg.task.name == "toy2d"
    assert tuple(_get(cfg, k) for k in TOY_KEYS) == pytest.approx(TOY[preset] + (0, 1)), preset


@pytest.mark.parametrize("preset", PRESETS)
def test_set_and_config_file_win_over_every_task_section(preset, tmp_path):
    """``--set`` of every key a task section sets, back to the toy's value, gives the toy's value on
    that task; a ``--config`` file does too, and ``--set`` wins over the file."""
    toy = build_config(preset)
    for task, section in _sections(preset).items():
        extra = ["task.model=sd15-tiny"] if task == "diffusers" else []
        leaves = _leaves(section)
        applied = build_config(preset, None, [f"task.name={task}", *extra])
        assert any(_get(applied, k) != _get(toy, k) for k in leaves), (task, "the section changes nothing")
        sets = [f"{k}={_get(toy, k)}" for k in leaves]
        back = build_config(preset, None, [f"task.name={task}", *extra, *sets])
        for k in leaves:
            assert _get(back, k) == _get(toy, k), (task, k)
        f = tmp_path / f"{task}.yaml"
        # (a fused epoch differentiates one graph per step once: micro-batches need it off)
        fused = "  fused_epoch: false\n" if toy.train.fused_epoch else ""
        f.write_text(f"task:\n  name: {task}\ntrain:\n  lr: 0.0123\n  grad_accum: 3\n{fused}")
        byfile = build_config(preset, str(f), extra)
        assert (byfile.train.lr, byfile.train.grad_accum) == (0.0123, 3)
        assert build_config(preset, str(f), [*extra, "train.lr=0.0456"]).train.lr == 0.0456


@pytest.mark.parametrize("preset", PRESETS)
def test_sections_apply_only_to_their_task(preset):
    toy = asdict(build_config(preset))
    assert asdict(build_config(preset, None, ["task.name=toy2d"])) == toy
    for task in ("digits-ddim", "digits-flow", "diffusers"):
        # named then replaced by --set: the last task named decides, and the toy sees no section
        assert asdict(build_config(preset, None, [f"task.name={task}", "task.name=toy2d"])) == toy


@pytest.mark.parametrize("preset", PRESETS)
def test_digits_sections_set_sizes_only(preset):
    for task in DIGITS:
        section = _sections(preset).get(task, {})
        extra = set(_leaves(section)) - DIGITS_KEYS
        if preset == "grpo" and task == "digits-flow":
            extra -= {"method.kl_dt_weight", "method.adv_norm", "train.timestep_fraction"}
        assert not extra, (preset, task, extra)


@pytest.mark.parametrize("task", DIGITS)
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_fits_digits_with_its_own_defaults(preset, task, monkeypatch):
    """`--task digits-ddim --preset grpo` with the 2-D sizes was OOM-killed at 22.9 GB; every preset's
    own digits defaults estimate well under DIGITS_LIMIT, and where a digits section exists, it is what
    makes the run smaller."""
    cfg = build_config(preset, None, [f"task.name={task}"])
    assert cfg.task.name == task
    est = estimate_memory(cfg, task_geometry(cfg)).total
    assert est < DIGITS_LIMIT, (preset, task, est / 2**30)
    if task in _sections(preset):
        _without_task_sections(monkeypatch)
        bare = build_config(preset, None, [f"task.name={task}"])
        assert estimate_memory(bare, task_geometry(bare)).total > est


def test_tempflow_chain_changes_one_thing_on_every_task():
    """tempflow-grpo-rsm -> tempflow-evr (allocation) -> rsm-evr (loss form), and the cost-aware pair:
    on digits and image models the presets differ in exactly what they differ in on the toy."""
    def diff(a, b):
        a, b = asdict(a), asdict(b)
        return {(s, k) for s in a if isinstance(a[s], dict) for k in a[s] if a[s][k] != b[s][k]}

    for a, b in [("tempflow-grpo-rsm", "tempflow-evr"), ("tempflow-evr", "rsm-evr"),
                 ("tempflow-grpo-rsm", "tempflow-evr-cost"), ("tempflow-evr-cost", "rsm-evr-cost"),
                 ("tempflow-grpo-k1", "tempflow-evr-k1")]:
        on_toy = diff(build_config(a), build_config(b))
        assert on_toy
        for task in ("digits-flow", "diffusers"):
            sets = [f"task.name={task}"]
            assert diff(build_config(a, None, sets), build_config(b, None, sets)) == on_toy, (a, b, task)
