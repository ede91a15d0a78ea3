"""fdpg: fused kernels and a fast training loop for distribution matching (DPG, GDC++, f-DPG, KL-control)."""
from . import divergences, reference
from .ops import (
    FDPGCoefficients,
    LinearLogprobs,
    PairedLinearLogprobs,
    PairedTokenStats,
    completion_mask,
    divergence_estimates,
    fdpg_coefficients,
    linear_token_logprobs,
    paired_linear_token_logprobs,
    paired_token_logprobs,
    paired_token_stats,
    sequence_logprobs,
    token_logprobs,
)

__version__ = "0.1.0"

__all__ = [
    "token_logprobs", "paired_token_logprobs", "paired_token_stats", "PairedTokenStats", "sequence_logprobs", "completion_mask",
    "linear_token_logprobs", "paired_linear_token_logprobs", "LinearLogprobs", "PairedLinearLogprobs",
    "fdpg_coefficients", "divergence_estimates", "FDPGCoefficients",
    "divergences", "reference",
]
