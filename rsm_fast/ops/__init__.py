"""Fused RSM ops: the ZO row loss, the score-regression loss, the forward-process (DiffusionNFT / AWM)
loss and the sampler step.

``decomposed`` states the math every backend implements (Triton on CUDA, C++ on CPU, plain torch
as the fallback); ``library`` registers the custom ops with autograd and fake kernels; ``api``
holds the checked, user-facing functions with the reference losses' signatures.
"""
from .api import (FiniteCheck, FusedOpInputError, FusedOpNonFiniteError, awm_log_likelihood, awm_loss,
                  deferred_finite_check, nft_loss, rows_finite, sampler_step, score_loss, zo_loss)

__all__ = ["FiniteCheck", "FusedOpInputError", "FusedOpNonFiniteError", "awm_log_likelihood", "awm_loss",
           "deferred_finite_check", "nft_loss", "rows_finite", "sampler_step", "score_loss", "zo_loss"]
