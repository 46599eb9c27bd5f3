"""LoRA and the frozen reference (issue 5, item 3): only LoRA weights train; the gated reference
equals the base model bit for bit while the LoRA is non-zero; switching policy <-> reference is a
buffer write that a compiled graph follows without recompiling; the exported LoRA loads into the
diffusers pipelines (``load_lora_weights``) and reproduces our outputs; full fine-tuning keeps a
frozen copy."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("peft")

from rsm_fast.models import build_model  # noqa: E402
from rsm_fast.models import lora as L  # noqa: E402

PROMPTS = ["a red cat", "two blue dogs"]


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models, one intra-op thread


def _perturbed(name, rank=4, alpha=8.0):
    m = build_model(name, seed=1)
    base = copy.deepcopy(m.denoiser)
    params = m.add_lora(rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m, base


def _inputs(m):
    x = torch.randn(2, *m.latent_shape(16, 16), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([901.0, 301.0]) if m.family == "sd15" else torch.tensor([0.9, 0.3])
    return x, t, m.encode_prompts(PROMPTS)


@pytest.mark.parametrize("name", ["sd15-tiny", "sd3-tiny"])
def test_only_lora_trains_and_reference_is_the_base_exactly(name):
    m, base = _perturbed(name)
    trainable = {n for n, p in m.denoiser.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} <= {"to_q", "to_k", "to_v", "0"}
    assert {id(p) for p in m.trainable_parameters()} == {id(p) for n, p in m.denoiser.named_parameters()
                                                          if n in trainable}
    x, t, cond = _inputs(m)
    f, r = m.policy(x, t, cond), m.reference(x, t, cond)
    assert (f - r).abs().max() > 1e-2                        # the LoRA is non-zero ...
    assert torch.equal(r, m._denoise(base, x, t, cond).float())   # ... and the reference is the base
    assert float(m.gate.value) == 1.0                        # reference() restored the gate
    f.square().mean().backward()                             # a reference call between forward and backward
    grads = [p.grad.clone() for p in m.trainable_parameters()]
    assert all(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in m.denoiser.parameters() if not p.requires_grad)
    m.denoiser.zero_grad(set_to_none=True)
    m.policy(x, t, cond).square().mean().backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(m.trainable_parameters(), grads))


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.other = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.other(torch.tanh(self.to_q(x)) * self.to_k(x))


def test_gate_switch_is_a_value_change_under_compile():
    """One compiled frame serves policy and reference: the gate is a buffer read at run time."""
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    toy = _Toy()
    base = copy.deepcopy(toy)
    gate = L.add_lora(toy, rank=2, target_modules=("to_q", "to_k"))
    assert [n for n, p in toy.named_parameters() if p.requires_grad] == [
        "to_q.lora_A.default.weight", "to_q.lora_B.default.weight", "to_k.lora_A.default.weight",
        "to_k.lora_B.default.weight"]
    with torch.no_grad():
        for p in L.lora_parameters(toy):
            p.normal_()
    cnt = CompileCounter()
    compiled = torch.compile(toy, backend=cnt, fullgraph=True)
    x = torch.randn(3, 8)
    y1 = compiled(x)
    with L.gated(gate, 0.0):
        y0 = compiled(x)
    y1b = compiled(x)
    assert cnt.frame_count == 1
    assert torch.equal(y0, base(x)) and torch.equal(y1, y1b) and (y1 - y0).abs().max() > 0.1
    toy.to(torch.float64)                                     # one gate, moved once for all layers
    gates = {id(mod.gate) for mod in toy.modules() if isinstance(mod, L.GatedLinear)}
    assert len(gates) == 1 and gate.value.dtype == torch.float64


@pytest.mark.parametrize("name", ["sd15-tiny", "sd3-tiny"])
def test_export_round_trips_through_load_lora_weights(name, tmp_path):
    """alpha (8) != rank (4): the pipeline must read the exported adapter metadata to match."""
    m, base = _perturbed(name, rank=4, alpha=8.0)
    out = m.export_lora(tmp_path / "lora")
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    pipe = m.pipeline(copy.deepcopy(base))
    pipe.load_lora_weights(str(out))
    loaded = pipe.unet if m.family == "sd15" else pipe.transformer
    x, t, cond = _inputs(m)
    ours = m.policy(x, t, cond)
    theirs = m._denoise(loaded, x, t, cond).float()
    torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=1e-6)
    assert (ours - m._denoise(base, x, t, cond).float()).abs().max() > 1e-2


def test_full_finetune_reference_is_a_frozen_copy():
    m = build_model("sd15-tiny", seed=1)
    params = m.enable_full_finetune()
    assert len(params) == len(list(m.denoiser.parameters()))
    x, t, cond = _inputs(m)
    r0 = m.reference(x, t, cond)
    opt = m.make_optimizer(lr=1e-2)
    m.policy(x, t, cond).square().mean().backward()
    opt.step()
    assert torch.equal(m.reference(x, t, cond), r0)
    assert (m.policy(x, t, cond) - r0).abs().max() > 1e-3
    with pytest.raises(RuntimeError, match="exclusive"):
        m.add_lora()


# -- policy.lora_targets that match nothing: one line, a few names that would ----------------------
def _digits_unet():
    from rsm_fast.tasks import digits as D

    return D.make_unet()


@pytest.mark.parametrize("targets, needle", [
    (("to_qq",), "'to_qq' matches no module"),
    (("to_q", "nope"), "'nope' matches no module"),
    (("conv1",), "matches Conv2d layers"),
    ((), "is empty"),
])
def test_targets_that_match_no_linear_layer_are_one_line(targets, needle):
    from rsm_fast.config import ConfigError

    unet = _digits_unet()
    with pytest.raises(ConfigError) as e:
        L.add_lora(unet, rank=2, target_modules=targets)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("config field 'policy.lora_targets'") and needle in msg
    assert "to_q" in msg and "to_out.0" in msg              # names that would match
    assert not getattr(unet, "peft_config", None)         # nothing was injected
    assert all(p.requires_grad for p in unet.parameters())


def test_linear_targets_lists_short_names():
    names = L.linear_targets(_digits_unet())
    assert {"to_q", "to_k", "to_v", "to_out.0"} <= set(names)
    assert all(not n.split(".")[0].isdigit() for n in names)


def test_bad_targets_end_the_cli_in_one_line(tmp_path, capsys):
    from rsm_fast.train import main

    rc = main(["--preset", "grpo", "--quiet", "--out", str(tmp_path / "run"), "--set", "task.name=digits-ddim",
               "--set", "policy.lora_targets=to_q,attn_typo", "--set", "train.threads=1",
               "--set", "train.batch_size=16", "--set", "task.eval_samples=16"])     # fits the memory preflight
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: config field 'policy.lora_targets'")
    assert "attn_typo" in lines[0] and "Traceback" not in err
