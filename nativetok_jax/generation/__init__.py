"""Sampling token ids from the second-stage generators (logit filters, autoregressive sampler)."""

from nativetok_jax.generation.autoregressive import sample, sampler
from nativetok_jax.generation.sampling import filter_logits, guide, top_k_filter, top_p_filter

__all__ = ["filter_logits", "guide", "sample", "sampler", "top_k_filter", "top_p_filter"]
