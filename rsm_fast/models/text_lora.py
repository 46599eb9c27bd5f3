"""Text-encoder LoRA (``policy.train_text_encoder``): prompts re-encoded by trained encoders in every call.

With a LoRA on the text encoders the conditioning is no longer a constant of the prompt: the policy
sees ``E_θ(prompt)`` and its gradient flows into the encoders' LoRA, the reference sees the base
encoders' ``E_0(prompt)``. The engine's convention stays "one plain tensor per prompt": in this mode
the rows are **prompt indices** (``int64 [P, 1]``) into a :class:`PromptTable` the adapter holds (the
task's prompt list and ``""`` for CFG, tokenised once), and the adapter's ``policy`` / ``reference``
turn indices into embedding rows inside the call, under the LoRA gate they run with. The engine's
``index_select`` / slicing / ``cat`` / ``expand`` apply to indices unchanged.

* **Which encoders.** SD1.5: the CLIP text model. SD3: CLIP-L and CLIP-G; T5 stays frozen: its rows
  are taken once per prompt from the base conditioning (the text cache, or the encoders at start)
  and kept in CPU memory (``[P, 256, 4096]`` in the model dtype: 2 MiB a prompt in bf16), then T5 is
  freed. Targets and rank as diffusers' ``train_dreambooth_lora*.py`` with ``--train_text_encoder``
  (``q_proj, k_proj, v_proj, out_proj``, the denoiser's rank and alpha).
* **Reference.** The text LoRAs share the denoiser's :class:`~.lora.LoraGate`: one ``fill_(0)``
  turns every LoRA off, so the reference is the base pipeline (base encoders and base denoiser).
* **Cost.** Inside a call, each distinct prompt of the rows is encoded once (``unique`` + gather:
  the backward sums the rows' gradients into the one encoding), one prompt per encoder call so its
  rows are the same whatever else the call holds. Without grad (rollout, reference,
  the old policy) encodings are memoised per (gate value, prompt) until a trained text parameter
  changes (its storage or its in-place version counter: an optimizer step, a checkpoint load, an
  EMA swap), so a rollout encodes each prompt once per epoch. The host-side lookups make this mode
  eager only (``rollout.graphs`` is refused).
* **Determinism.** Indices are positions in the task's prompt list, so they do not depend on the
  order prompts are drawn in (a resumed run or another rank builds the same table).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import lora as L

TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")   # diffusers train_dreambooth_lora*.py text_lora_config


class PromptTable:
    """The prompts a text-LoRA run may condition on: token ids on the device (``[N, n]``) and the
    frozen part of their conditioning in CPU memory (``[N, ...]``, or None)."""

    def __init__(self, prompts: Sequence[str], ids: Tensor, frozen: Tensor | None):
        self.prompts = list(prompts)
        self.position = {p: i for i, p in enumerate(self.prompts)}
        self.ids, self.frozen = ids, frozen

    def __len__(self) -> int:
        return len(self.prompts)

    def index(self, prompts: Sequence[str]) -> Tensor:
        """``int64 [P, 1]`` positions of ``prompts``; a prompt outside the table is one line."""
        try:
            return torch.tensor([[self.position[p]] for p in prompts], dtype=torch.long).reshape(len(prompts), 1)
        except KeyError as e:
            raise ValueError(f"prompt {e.args[0]!r} is not among the {len(self)} prompts the text-encoder LoRA was "
                             f"set up with (the task's prompt list and '')") from None


class TextLoraMixin:
    """The text-encoder LoRA half of :class:`~.adapter.DiffusionAdapter` (see the module docstring).

    A family provides ``TRAINED_TEXT`` (the encoders that train), ``_token_ids(prompts) -> [P, n]``,
    ``_frozen_rows(base_cond) -> [P, ...] | None`` (the part of a base conditioning row that stays
    frozen) and ``_text_rows(ids, frozen) -> cond`` (the conditioning through the loaded encoders)."""

    TRAINED_TEXT: tuple[str, ...] = ()

    @property
    def text_lora(self) -> bool:
        return self._table is not None

    def add_text_lora(self, prompts: Sequence[str], rank: int = 8, alpha: float | None = None,
                      target_modules=TEXT_TARGETS, dropout: float = 0.0) -> list:
        """LoRA on the trained text encoders, sharing the denoiser's gate; ``prompts``: every prompt
        the run will condition on (``""`` is added). Returns all trainable parameters."""
        if self.gate is None:
            raise RuntimeError("add the denoiser's LoRA first (add_lora): the text LoRA shares its gate")
        if self._table is not None:
            raise RuntimeError("the text encoders already have a LoRA")
        if not self.TRAINED_TEXT:
            raise NotImplementedError(f"{type(self).__name__} has no text-encoder LoRA")
        names = list(dict.fromkeys([*prompts, ""]))
        # the frozen part from the base rows (cache or encoders, before any text LoRA), a chunk at a time
        parts = [self._frozen_rows(self.encode_prompts(names[i:i + 64])) for i in range(0, len(names), 64)]
        frozen = None if parts[0] is None else torch.cat([f.detach().cpu() for f in parts])
        self.load_text_encoders(self.TRAINED_TEXT)
        ids = self._token_ids(names).to(self.device)
        for k in self.TRAINED_TEXT:
            m = self.text[k].to(self.device)      # trained: on the device even under offload
            L.add_lora(m, rank, alpha, target_modules, dropout, gate=self.gate, field="policy.text_lora_targets")
        for k in self.TEXT_ENCODERS:              # the frozen ones (T5) are done: their rows are kept
            if k not in self.TRAINED_TEXT:
                self.text[k] = None
        self._table = PromptTable(names, ids, frozen)
        self._uncond = None                       # now an index
        self._memo, self._memo_version = {}, ()
        return self.trainable_parameters()

    def _conditioning(self, cond: Tensor | None) -> Tensor | None:
        """Rows for the denoiser: ``cond`` itself, or (text LoRA) the encodings of its prompt indices."""
        if self._table is None or cond is None or cond.is_floating_point():
            return cond
        return self._prompt_rows(cond)

    def _text_version(self) -> tuple:
        return tuple((p.data_ptr(), p._version) for k in self.TRAINED_TEXT
                     for p in self.text[k].parameters() if p.requires_grad)

    def _encode_rows(self, keys: list[int]) -> Tensor:
        """The table's prompts ``keys`` through the encoders, one prompt per call: a prompt's rows then
        never depend on which prompts share its call (CPU GEMMs round by batch size), so a rank, a
        chunk or a resumed run encodes it bit for bit as one process does."""
        t = self._table
        rows = [self._text_rows(t.ids[k:k + 1], None if t.frozen is None else t.frozen[k:k + 1]) for k in keys]
        return torch.cat(rows).to(self.dtype)

    def _prompt_rows(self, index: Tensor) -> Tensor:
        idx = index.reshape(-1).to(torch.long)
        uniq, inv = torch.unique(idx, sorted=True, return_inverse=True)
        keys = uniq.tolist()
        if torch.is_grad_enabled():
            rows = self._encode_rows(keys)
        else:
            version = self._text_version()
            if version != self._memo_version:
                self._memo, self._memo_version = {}, version
            g = float(self.gate.value)
            miss = [k for k in keys if (g, k) not in self._memo]
            if miss:
                for k, r in zip(miss, self._encode_rows(miss)):
                    self._memo[(g, k)] = r
            rows = torch.stack([self._memo[(g, k)] for k in keys])
        return rows.index_select(0, inv.to(rows.device))
