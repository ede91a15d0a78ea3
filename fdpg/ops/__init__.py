"""The public ops: argument checks, backend choice and dispatch. One module per op family."""
from .coefficients import FDPGCoefficients, divergence_estimates, fdpg_coefficients
from .linear import LinearLogprobs, PairedLinearLogprobs, linear_token_logprobs, paired_linear_token_logprobs
from .logprobs import (
    PairedTokenStats,
    completion_mask,
    paired_token_logprobs,
    paired_token_stats,
    sequence_logprobs,
    token_logprobs,
)

__all__ = [
    "token_logprobs", "paired_token_logprobs", "paired_token_stats", "PairedTokenStats", "sequence_logprobs", "completion_mask",
    "linear_token_logprobs", "paired_linear_token_logprobs", "LinearLogprobs", "PairedLinearLogprobs",
    "fdpg_coefficients", "divergence_estimates", "FDPGCoefficients",
]
