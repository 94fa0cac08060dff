"""Reconstruction quality of a tokenizer on a fixed image set, for all tokens and for prefixes."""

from __future__ import annotations

import numpy as np

from nativetok_jax.evaluation.metrics import psnr
from nativetok_jax.models.quantizer import code_statistics
from nativetok_jax.tokenizer import Tokenizer, preview_lengths


def evaluate_reconstruction(
    tokenizer: Tokenizer, images: np.ndarray, batch_size: int, num_shown: int = 8
) -> tuple[dict[str, float], list[np.ndarray]]:
    """PSNR for every preview length, codebook statistics, and grid rows of the first images.

    Returns ``(metrics, rows)``: ``metrics`` has ``psnr`` (all tokens), ``psnr_first_{k}``,
    ``codebook_usage`` and ``perplexity`` (of the evaluation set's ids); ``rows`` are the inputs
    and their reconstructions from each preview length, ``num_shown`` images each.
    """
    ids = np.concatenate(
        [np.asarray(tokenizer.encode(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    )
    metrics: dict[str, float] = {}
    rows = [images[:num_shown]]
    for k in preview_lengths(tokenizer.num_tokens):
        reconstruction = np.concatenate(
            [np.asarray(tokenizer.decode(ids[i : i + batch_size, :k])) for i in range(0, len(ids), batch_size)]
        )
        metrics[f"psnr_first_{k}"] = psnr(images, reconstruction)
        rows.append(reconstruction[:num_shown])
    metrics["psnr"] = metrics[f"psnr_first_{tokenizer.num_tokens}"]
    perplexity, usage = code_statistics(ids, tokenizer.codebook_size)
    metrics.update(perplexity=float(perplexity), codebook_usage=float(usage))
    return metrics, rows
