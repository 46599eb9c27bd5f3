"""The launch recipes under recipes/ (issue 18, item 8): each loads and validates, names its launch
command and GPU count, splits its global batch into whole groups over those GPUs, resolves its K
profile, names LoRA targets that exist in the real architecture, and, pointed at a model folder
that does not exist, stops with the one-line ``task.model`` error (exit 2) before writing anything."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rsm_fast.config import build_config
from rsm_fast.engine.profiles import resolve_profile
from rsm_fast.engine.waves import split_groups

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
# file -> (GPUs, model family, K profile or None)
EXPECTED = {
    "rsm_sd35m_geneval_lowsnr2.yaml": (4, "sd3", [6, 6, 8, 10, 0, 0, 0, 0, 0, 0]),
    "flow_grpo_sd35m_geneval.yaml": (8, "sd3", None),
    "ddpo_sd15_1gpu.yaml": (1, "sd15", None),
}
# on a machine without CUDA the recipes' train.device=cuda is refused by design; validate the rest
DEVICE = [] if torch.cuda.is_available() else ["train.device=cpu"]


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _gpus(path: Path) -> int:
    """The GPU count of the launch command in the header comments (torchrun's --nproc_per_node,
    else 1 for a plain ``python -m rsm_fast.train``)."""
    header = "\n".join(ln for ln in path.read_text().splitlines() if ln.startswith("#"))
    m = re.search(r"torchrun\b.*--nproc_per_node[ =](\d+)", header)
    if m:
        return int(m.group(1))
    assert "python -m rsm_fast.train --config recipes/" + path.name in header, f"{path.name}: no launch command"
    return 1


def test_the_three_recipes_exist():
    assert sorted(p.name for p in RECIPES) == sorted(EXPECTED)
    assert (ROOT / "recipes" / "README.md").is_file()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_validates_and_says_how_to_launch(path):
    cfg = build_config(None, str(path), DEVICE)
    raw = _raw(path)
    gpus, family, _ = EXPECTED[path.name]
    assert _gpus(path) == gpus
    text = path.read_text()
    assert text.startswith("#"), "a recipe starts with its comments (sources, launch command)"
    assert f"--config recipes/{path.name}" in text
    if gpus > 1:
        assert "--resume runs/" in text                 # torchrun restarts continue the run
    assert cfg.task.name == "diffusers"
    assert raw["train"]["device"] == "cuda" and raw["policy"]["dtype"] == "bf16"
    assert cfg.policy.gradient_checkpointing is True and cfg.train.optimizer == "adamw"
    assert cfg.task.text_cache not in ("", "off")
    assert Path(cfg.task.model).is_absolute()           # a local folder the user edits
    assert "task.model" in text and "EDIT" in text


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_global_batch_splits_into_whole_groups_over_the_gpus(path):
    cfg = build_config(None, str(path), DEVICE)
    gpus = EXPECTED[path.name][0]
    G = cfg.method.group_size
    assert G > 0 and cfg.train.batch_size % G == 0
    groups = cfg.train.batch_size // G
    assert groups % gpus == 0, f"{groups} groups over {gpus} GPUs"
    blocks = split_groups(groups, gpus)                 # the trainer's contiguous per-rank blocks
    assert [n for _, n in blocks] == [groups // gpus] * gpus


MICRO_BATCH = {"rsm_sd35m_geneval_lowsnr2.yaml": (1440, 12), "flow_grpo_sd35m_geneval.yaml": (1296, 9),
               "ddpo_sd15_1gpu.yaml": (1600, 4)}     # (records per rank and update, records per micro-batch)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_records_per_rank_and_micro_batch_match_the_comments(path):
    """The trained records one rank holds (the plan of the same architecture's named config: 10
    SD3.5-M steps, 9 of them trained for Flow-GRPO; 50 SD1.5 steps) and the micro-batch that
    train.grad_accum cuts them into, as each recipe's comments state."""
    from rsm_fast.preflight import plan_counts, task_geometry

    gpus, family, _ = EXPECTED[path.name]
    model = {"sd3": "sd35m-full", "sd15": "sd15-full"}[family]
    batch = build_config(None, str(path), DEVICE).train.batch_size
    cfg = build_config(None, str(path), [*DEVICE, f"task.model={model}", "task.prompts=",
                                         f"train.batch_size={batch // gpus}"])      # one rank's whole groups
    geo = task_geometry(cfg)
    records = plan_counts(cfg, geo.sde_mask).records
    assert (records, records // cfg.train.grad_accum) == MICRO_BATCH[path.name]
    assert records % cfg.train.grad_accum == 0


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_k_profile_resolves(path):
    cfg = build_config(None, str(path), DEVICE)
    want = EXPECTED[path.name][2]
    if want is None:
        assert cfg.rollout.plan == "sde" and not cfg.rollout.profile
    else:
        assert cfg.rollout.plan == "branch"
        assert resolve_profile(cfg.rollout.profile, cfg.task.num_steps) == want


def test_geneval_recipes_use_the_http_reward_client():
    for name in ("rsm_sd35m_geneval_lowsnr2.yaml", "flow_grpo_sd35m_geneval.yaml"):
        path = ROOT / "recipes" / name
        cfg = build_config(None, str(path), DEVICE)
        assert cfg.task.reward.startswith(("http://", "https://"))
        assert "GenEval" in path.read_text() and "rsm_fast/rewards/remote.py" in path.read_text()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_lora_targets_exist_in_the_architecture(path):
    """The targets match Linear layers of the real-size denoiser (built on the meta device: no memory)."""
    pytest.importorskip("diffusers")
    from rsm_fast.models.configs import get_config
    from rsm_fast.models.lora import check_targets

    cfg = build_config(None, str(path), DEVICE)
    family = EXPECTED[path.name][1]
    with torch.device("meta"):
        if family == "sd3":
            from diffusers import SD3Transformer2DModel
            model = SD3Transformer2DModel(**get_config("sd35m-full")[1]["transformer"])
        else:
            from diffusers import UNet2DConditionModel
            model = UNet2DConditionModel(**get_config("sd15-full")[1]["unet"])
    check_targets(model, cfg.policy.lora_targets.split(","))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_cli_with_a_missing_model_folder_fails_in_one_line(path, tmp_path):
    out = tmp_path / "run"
    missing = tmp_path / "no-such-model"
    extra = list(DEVICE)
    if _raw(path)["task"].get("prompts"):          # the recipe's prompt file is the user's: give one
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text('{"prompt": "a photo of a cat"}\n{"prompt": "a photo of two dogs"}\n')
        extra.append(f"task.prompts={prompts}")
    r = subprocess.run([sys.executable, "-m", "rsm_fast.train", "--config", str(path), "--set",
                        f"task.model={missing}", *[a for s in extra for a in ("--set", s)], "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "task.model" in lines[0] and str(missing) in lines[0], r.stderr
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_fits_an_80gb_gpu_by_the_preflight_estimate(path):
    """The pre-flight memory estimate (rsm_fast.preflight.check_memory, on the meta device) of one
    rank, with the named config of the same architecture in place of the user's folder, is below
    an H100's ~78 GiB (an estimate, not a measurement; ~15 s per SD3.5-M recipe)."""
    pytest.importorskip("diffusers")
    from rsm_fast.preflight import check_memory

    gpus, family, _ = EXPECTED[path.name]
    model = {"sd3": "sd35m-full", "sd15": "sd15-full"}[family]
    cfg = build_config(None, str(path), [*DEVICE, f"task.model={model}", "task.prompts="])
    est = check_memory(cfg, torch.device("cuda"), available=78 * 2**30, host=10**15, world_size=gpus)
    assert est is not None and est.total < 78 * 2**30
