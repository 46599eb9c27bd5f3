"""Text-encoder LoRA (``policy.train_text_encoder``, issue 18 item 7).

* tiny SD1.5 and SD3 pipelines train two epochs with a LoRA on the denoiser and the CLIP text
  encoders: only LoRA weights move, both kinds move; the export loads into a fresh diffusers pipeline
  (``load_lora_weights``) whose own ``encode_prompt`` gives our policy's conditioning and whose
  denoiser our policy's output; the reference is the base pipeline, bit for bit;
* the in-call encoding (each distinct prompt once, gathered to the rows) has the gradient of
  encoding every row on its own, and its no-grad memo follows every in-place change of the text
  LoRA and the gate;
* a killed run resumes to the uninterrupted run exactly; 2 DDP ranks train what one process trains;
* bad settings are one-line config errors naming the field.
"""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from rsm_fast.config import ConfigError, build_config  # noqa: E402
from rsm_fast.models import build_model  # noqa: E402
from rsm_fast.models.lora import gated  # noqa: E402
from rsm_fast.runlog import RunDir  # noqa: E402
from rsm_fast.trainer import Trainer  # noqa: E402

PROMPTS = ("a red cat", "two blue dogs", "a green tree")
TINY = ["task.name=diffusers", "task.num_steps=4", "train.batch_size=4", "method.group_size=2",
        "task.eval_samples=2", "train.threads=1", "train.epochs=2", "train.lr=0.01", "policy.lora_rank=4",
        "policy.train_text_encoder=true", "task.reward=jpeg"]

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models, one intra-op thread


def _prompts(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    return f"task.prompts={f}"


def _pipeline_conditioning(pipe, family: str, prompts: list[str], adapter) -> torch.Tensor:
    """The conditioning rows diffusers' own ``encode_prompt`` gives, in the adapter's packed layout."""
    with torch.no_grad():
        if family == "sd15":
            pe, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
            return pe
        pe, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device="cpu",
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=adapter.max_sequence_length)
        return adapter.pack(pe, pooled)


@pytest.mark.parametrize("model", ["sd15-tiny", "sd3-tiny"])
def test_text_lora_trains_and_exports_for_diffusers(tmp_path, model):
    cfg = build_config("grpo", None, TINY + [f"task.model={model}", _prompts(tmp_path)])
    tr = Trainer(cfg)
    a = tr.task.adapter
    before = {k: v.detach().clone() for k, v in tr.policy.state_dict().items()}
    s = tr.run(RunDir(tmp_path / "run"), progress=False)
    after = tr.policy.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all("lora_" in k for k in moved)                 # base weights frozen
    assert {k.split(".")[0] for k in moved} == {"denoiser", *a.TRAINED_TEXT}
    assert a.text.get("text_encoder_3") is None                      # T5 (SD3) freed: its rows are kept

    fresh = build_model(model, seed=0)
    pipe = fresh.pipeline()
    base_pipe_cond = _pipeline_conditioning(pipe, fresh.family, list(PROMPTS[:2]), fresh)
    pipe.load_lora_weights(s["lora"])
    idx = a.encode_prompts(list(PROMPTS[:2]))
    assert idx.dtype == torch.long and idx.shape == (2, 1)
    x = torch.randn(2, *tr.task.latent_shape, generator=torch.Generator().manual_seed(0))
    t = tr.engine._t[:2].clone()
    with torch.no_grad():
        ours_cond = a._conditioning(idx)
        theirs_cond = _pipeline_conditioning(pipe, fresh.family, list(PROMPTS[:2]), fresh)
        ours = a.policy(x, t, idx)
        theirs = fresh._denoise(pipe.unet if fresh.family == "sd15" else pipe.transformer, x, t, theirs_cond).float()
        ref = a.reference(x, t, idx)
        base = build_model(model, seed=0)
        base_cond = torch.cat([base._encode([p]) for p in PROMPTS[:2]])        # one prompt per call, as ours
        base_out = base._denoise(base.denoiser, x, t, base_cond).float()
    torch.testing.assert_close(theirs_cond.float(), ours_cond.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (ours_cond.float() - base_pipe_cond.float()).abs().max() > 1e-4    # the text LoRA moved the rows
    torch.testing.assert_close(ref, base_out, rtol=0, atol=0)                  # gate 0: the base pipeline


def _adapter_with_text_lora(model: str = "sd3-tiny"):
    a = build_model(model, seed=0)
    a.add_lora(rank=4)
    a.add_text_lora(list(PROMPTS), rank=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():     # nonzero B so the text LoRA acts (peft starts B at zero)
        for k in a.TRAINED_TEXT:
            for n, p in a.text[k].named_parameters():
                if "lora_B" in n:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return a


def test_in_call_encoding_has_the_per_row_gradient_and_a_faithful_memo():
    a = _adapter_with_text_lora()
    params = [p for k in a.TRAINED_TEXT for p in a.text[k].parameters() if p.requires_grad]
    idx = torch.tensor([[1], [0], [1], [3], [1]])           # 3 is "" (the table appends it)
    assert a.encode_prompts([""]).item() == 3 and a.uncond().item() == 3
    w = torch.randn(5, *a._conditioning(idx).shape[1:], generator=torch.Generator().manual_seed(2))

    loss = (a._conditioning(idx).float() * w).sum()
    got = torch.autograd.grad(loss, params)
    rows = torch.cat([a._text_rows(a._table.ids[i:i + 1], a._table.frozen[i:i + 1]) for i in idx.flatten().tolist()])
    want = torch.autograd.grad((rows.float() * w).sum(), params)
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
    assert max(float(g.abs().max()) for g in got) > 0

    with torch.no_grad():
        first = a._conditioning(idx)
        assert a._memo and torch.equal(a._conditioning(idx), first)          # served from the memo
        with gated(a.gate, 0.0):
            base = a._conditioning(idx)
        params[0].add_(0.1)                                                  # an optimizer step, in place
        moved = a._conditioning(idx)
        fresh = a._encode_rows([1, 0, 1, 3, 1])
    assert not torch.equal(moved, first)
    torch.testing.assert_close(moved, fresh, rtol=0, atol=0)
    ref = build_model("sd3-tiny", seed=0)
    base_rows = ref._encode([PROMPTS[1], PROMPTS[0], PROMPTS[1], "", PROMPTS[1]])
    torch.testing.assert_close(base, base_rows, rtol=1e-6, atol=1e-6)


def test_unknown_prompt_is_one_line():
    a = _adapter_with_text_lora("sd15-tiny")
    with pytest.raises(ValueError, match="not among the 4 prompts"):
        a.encode_prompts(["a purple elephant"])


@pytest.mark.parametrize("sets, field", [
    (["policy.lora_rank=0"], "policy.train_text_encoder"),
    (["train.parallel=fsdp"], "policy.train_text_encoder"),
    (["rollout.graphs=true"], "rollout.graphs"),
    (["policy.text_lora_targets=q_proj, k proj"], "policy.text_lora_targets"),
])
def test_bad_text_lora_settings_are_config_errors(sets, field):
    with pytest.raises(ConfigError, match=field):
        build_config("grpo", None, TINY + ["task.model=sd15-tiny"] + sets)


def test_text_lora_is_refused_off_the_diffusers_task():
    with pytest.raises(ConfigError, match="policy.train_text_encoder"):
        build_config("grpo", None, ["task.name=digits-ddim", "policy.train_text_encoder=true"])


def test_text_lora_target_that_matches_nothing_names_the_field(tmp_path):
    cfg = build_config("grpo", None, TINY + ["task.model=sd15-tiny", "policy.text_lora_targets=to_q"])
    with pytest.raises(ConfigError, match="'policy.text_lora_targets': 'to_q' matches no module"):
        Trainer(cfg)


def test_killed_text_lora_run_resumes_to_the_uninterrupted_run(tmp_path):
    """SIGKILL after the second update, ``--resume``: weights (denoiser and text LoRA), log and
    summary equal the uninterrupted run bit for bit (the prompt table and the memo rebuild)."""
    from test_resume import _args, cli, log_records

    args = _args(["--preset", "grpo", *[s for s in TINY if not s.startswith("train.epochs")], "task.model=sd15-tiny",
                  _prompts(tmp_path), "train.epochs=4", "train.checkpoint_every=1"])
    ref = cli(tmp_path, "--out", "ref", *args)
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = cli(tmp_path, "--out", "run", *args, fault="after-epoch:2")
    assert killed.returncode == -9, killed.stderr[-2000:]
    done = cli(tmp_path, "--resume", "run")
    assert done.returncode == 0, done.stderr[-2000:]
    assert log_records(tmp_path / "ref") == log_records(tmp_path / "run")
    ca, cb = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("ref", "run"))
    assert ca["policy"].keys() == cb["policy"].keys()
    assert any(k.startswith("text_encoder.") and "lora_" in k for k in cb["policy"])
    assert all(torch.equal(ca["policy"][k], cb["policy"][k]) for k in ca["policy"])
    sa, sb = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("ref", "run"))
    assert {k: v for k, v in sa.items() if k not in ("seconds", "lora")} == \
        {k: v for k, v in sb.items() if k not in ("seconds", "lora")}
    from safetensors.torch import load_file

    ea, eb = (load_file(tmp_path / d / "lora" / "pytorch_lora_weights.safetensors") for d in ("ref", "run"))
    assert ea.keys() == eb.keys() and any(k.startswith("text_encoder.") for k in ea)
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_memory_estimate_keeps_the_trained_encoders_on_the_device():
    """The pre-flight estimate counts the CLIP encoders a text LoRA keeps on the device (also under
    task.offload=cpu, which moves only frozen parts) and their LoRA's float32 parameters."""
    from rsm_fast import memory_profile as MP
    from rsm_fast import preflight as P

    def geo(te: str, offload: str = ""):
        cfg = build_config("grpo", None, ["task.name=diffusers", "task.model=sd3-tiny", "policy.dtype=bf16",
                                          f"policy.train_text_encoder={te}", f"task.offload={offload}"])
        return MP.diffusers_profile(cfg), MP.image_geometry(cfg, P.task_geometry(cfg), device="cuda")

    (p0, g0), (p1, g1) = geo("false"), geo("true")
    a = build_model("sd3-tiny", seed=0)
    clip = sum(p.numel() for k in ("text_encoder", "text_encoder_2") for p in a.text[k].parameters())
    assert p0.clip_params == 0 and p1.clip_params == clip
    a.add_lora(rank=8)
    a.add_text_lora(list(PROMPTS), rank=8)
    text_lora = sum(p.numel() for k in a.TRAINED_TEXT for n, p in a.text[k].named_parameters() if "lora_" in n)
    assert p1.text_lora_params == text_lora
    assert g1.frozen_bytes - g0.frozen_bytes == 2 * clip                     # bf16, resident
    assert g1.param_bytes - g0.param_bytes == 4 * text_lora                  # float32 LoRA
    (_, h0), (_, h1) = geo("false", "cpu"), geo("true", "cpu")
    assert h1.frozen_bytes - h0.frozen_bytes == 2 * clip                     # offload leaves them on the device
