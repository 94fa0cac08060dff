"""Training's held-out reconstruction quality, through the evaluation ``python -m
nativetok_jax.evaluate`` runs (:func:`nativetok_jax.evaluation.tokenizer_metrics.evaluate_tokenizer`),
so a run's ``eval.json`` and the command report the same numbers for the same images."""

from __future__ import annotations

import numpy as np

from nativetok_jax.evaluation.tokenizer_metrics import evaluate_tokenizer
from nativetok_jax.tokenizer import Tokenizer


def evaluate_reconstruction(
    tokenizer: Tokenizer, images: np.ndarray, batch_size: int, num_shown: int = 8
) -> tuple[dict[str, float], list[np.ndarray]]:
    """Metrics for every preview length, and grid rows of the first images.

    ``images``: uint8 ``[N, S, S, 3]`` at the tokenizer's image size. Returns ``(metrics,
    rows)``: ``metrics`` has ``psnr`` (all tokens; per image, averaged over images),
    ``psnr_first_{k}`` for every prefix length k (1, 2, 4, ..., L), ``ssim`` (images of at least
    11 px), ``codebook_usage`` and ``perplexity`` (of all the set's ids), and ``rate_distortion``
    (a list of rows: every length's bits and figures beside the same-bits thumbnail and the mean
    colour, :mod:`nativetok_jax.evaluation.rate_distortion`); ``rows`` are the first ``num_shown``
    inputs and their reconstructions from each preview length (1, 4, 16, ..., L).
    """
    rows: list[np.ndarray] = []
    batches = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
    evaluation, _ = evaluate_tokenizer(tokenizer, batches, prefix=True, shown=rows, num_shown=num_shown)
    metrics = {f"psnr_first_{row['num_tokens']}": row["psnr"] for row in evaluation["prefix"]}
    metrics.update({key: value for key, value in evaluation.items() if key not in ("prefix", "num_images")})
    return metrics, rows
