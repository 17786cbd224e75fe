"""A learned prior over UNI2-h embeddings: synthetic conditions for PixCell, without a reference image."""

from .model import DEFAULT_FLOW_STEPS, UNIPrior, check_prior_fits, load_prior

__all__ = ["DEFAULT_FLOW_STEPS", "UNIPrior", "check_prior_fits", "load_prior"]
