"""RSM losses. ``reference`` is the plain float64-exact torch oracle (spec §3, §5, §6, §14)."""
from .reference import (
    REWEIGHTS,
    SURROGATE_FORMS,
    ZOLossOut,
    canonical_coefficients,
    kl_anchor_loss,
    score_regression_loss,
    zo_row_loss,
)

__all__ = [
    "REWEIGHTS",
    "SURROGATE_FORMS",
    "ZOLossOut",
    "canonical_coefficients",
    "kl_anchor_loss",
    "score_regression_loss",
    "zo_row_loss",
]
