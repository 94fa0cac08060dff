"""The tokenizer as a codec: the prefix decoder's rate-distortion curve beside no-model codecs
that spend the same bits.

A tokenizer's first k ids carry ``bits = k * log2(codebook_size)`` (a fixed-length code; an
entropy coder could spend fewer). At each k = 1, 2, 4, ..., L the curve holds the prefix
decoder's PSNR and SSIM (and LPIPS) next to

- the same-bits thumbnail (:func:`nativetok_jax.evaluation.baselines.same_bits_codec`): the
  largest ``s x s`` RGB thumbnail at 8 bits per value with ``24 s^2 <= bits``, enlarged
  bicubically; under 24 bits, the mean colour quantised to ``floor(bits / 3)`` bits per channel;
- the mean colour at 8 bits per channel (24 bits, whatever the row's budget): what a decoder that
  ignores its tokens can reach.

Every metric is per image and averaged over images, as the tokenizer's own
(:mod:`nativetok_jax.evaluation.tokenizer_metrics` accumulates both in one pass). A mean of PSNRs
is moved most by the images a codec reconstructs best: a flat crop that the thumbnail gives at
49 dB and a model at 35 dB outweighs several textured crops that the model wins by 2 dB each.
So each row also gives ``psnr_win_rate``: the share of images whose PSNR from the model's prefix
is above the same-bits codec's (ties count half), the figure that says how often the model is
the better codec.

A mean over a sample of crops moves with the sample (the demo tokenizer's margin over the thumbnail
moved 0.3 dB between two draws of 1,024 crops). So each row also gives ``psnr_margin``, the mean
per-image difference between the prefix's PSNR and the same-bits codec's, and ``psnr_margin_ci95``,
its paired 95 % confidence interval (Student's t on the per-image differences, ``scipy.stats.
ttest_1samp``): a margin whose interval holds 0 is not shown to be a win or a loss. The interval
is over the images given; crops drawn from a few photographs are not independent draws of
photographs, so it says nothing about other photographs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from scipy import stats

from nativetok_jax.evaluation.baselines import mean_colour, same_bits_codec, token_bits

MEAN_COLOUR = "mean_colour"
PROTOCOL = ("bits = tokens x log2(codebook_size); thumbnail: the largest s x s RGB thumbnail at 8 bits per value "
            "with 24 s^2 <= bits (PIL box downscaling, bicubic enlargement), under 24 bits the mean colour "
            "quantised to floor(bits / 3) bits per channel (same_bits_codec says which); mean colour: each image's "
            "mean colour at 8 bits per channel (24 bits at every row); metrics per image, averaged over images; "
            "psnr_win_rate: the share of images whose PSNR from the prefix is above the same-bits codec's "
            "(ties count half); psnr_margin: the mean per-image PSNR of the prefix minus the same-bits codec's, "
            "psnr_margin_ci95 its paired 95 % confidence interval over the images (Student's t)")

PairMetrics = Callable[[np.ndarray, np.ndarray], Mapping[str, np.ndarray]]


class SameBitsTotals:
    """The no-model codecs' metric sums at the bit budget of every prefix length.

    ``lengths``: the prefix lengths (tokens); ``codebook_size``: the tokenizer's. Each distinct
    codec is run once per batch, however many lengths share it.
    """

    def __init__(self, lengths: Iterable[int], codebook_size: int):
        self.codebook_size = codebook_size
        self.codecs = {k: same_bits_codec(token_bits(k, codebook_size)) for k in lengths}
        self.reconstruct: dict[str, Callable[[np.ndarray], np.ndarray]] = {
            codec.name: codec for codec in self.codecs.values()}
        self.reconstruct[MEAN_COLOUR] = mean_colour
        self.sums: dict[str, dict[str, float]] = {name: {} for name in self.reconstruct}
        # Per prefix length, per image: model - codec (the win rate and the margin both come from these).
        self.margins: dict[int, list[np.ndarray]] = {k: [] for k in self.codecs}
        self._batch_psnr: dict[str, np.ndarray] = {}  # per codec: the last batch's per-image PSNR

    def add(self, images: np.ndarray, count: int, pair_metrics: PairMetrics) -> None:
        """Adds the first ``count`` images of the uint8 batch ``images`` (padded past ``count``, so
        ``pair_metrics(originals, reconstructions) -> {metric: [B]}`` keeps one compiled shape)."""
        for name, codec in self.reconstruct.items():
            for metric, values in pair_metrics(images, codec(images)).items():
                totals = self.sums[name]
                totals[metric] = totals.get(metric, 0.0) + float(np.sum(np.asarray(values)[:count], dtype=np.float64))
                if metric == "psnr":
                    self._batch_psnr[name] = np.asarray(values, np.float64)[:count]

    def compare(self, tokens: int, psnr: np.ndarray) -> None:
        """Keeps, for the images of the batch last given to :meth:`add`, the difference between
        ``psnr`` (per image, from the first ``tokens`` ids) and the same-bits codec's: positive where
        the model is better, 0 on a tie."""
        codec = self._batch_psnr[self.codecs[tokens].name]
        model = np.asarray(psnr, np.float64)[: len(codec)]
        # Equal PSNRs (an exact reconstruction from both is inf on both) differ by 0, not inf - inf.
        self.margins[tokens].append(np.where(model == codec, 0.0, model - codec))

    def rows(self, prefix_rows: Iterable[Mapping[str, Any]], num_images: int) -> list[dict[str, Any]]:
        """One row per prefix length: ``tokens``, ``bits``, the model's ``psnr``, ``ssim`` (and
        ``lpips``) from ``prefix_rows`` (the evaluation's ``prefix`` list), the same-bits codec
        (``same_bits_codec``, its name; ``same_bits_codec_description``; ``thumbnail_side``,
        ``thumbnail_bits``, ``thumbnail_bits_per_channel``)
        and its ``thumbnail_<metric>``, ``mean_colour_<metric>``, ``psnr_win_rate`` (the share of
        images on which the model's PSNR is above the same-bits codec's; :meth:`compare`),
        ``psnr_margin`` (dB, the mean of the per-image differences, i.e. ``psnr - thumbnail_psnr``)
        and ``psnr_margin_ci95`` (``[low, high]`` dB; ``[nan, nan]`` for a single image)."""
        means = {name: {metric: total / num_images for metric, total in sums.items()}
                 for name, sums in self.sums.items()}
        rows = []
        for prefix in prefix_rows:
            k = prefix["num_tokens"]
            codec = self.codecs[k]
            row: dict[str, Any] = {"tokens": k, "bits": token_bits(k, self.codebook_size)}
            row.update({metric: prefix[metric] for metric in ("psnr", "ssim", "lpips") if metric in prefix})
            row.update(same_bits_codec=codec.name, same_bits_codec_description=codec.description,
                       thumbnail_side=codec.side, thumbnail_bits=codec.bits,
                       thumbnail_bits_per_channel=codec.bits_per_channel)
            row.update({f"thumbnail_{metric}": value for metric, value in means[codec.name].items()})
            row.update({f"{MEAN_COLOUR}_{metric}": value for metric, value in means[MEAN_COLOUR].items()})
            differences = np.concatenate(self.margins[k])
            row["psnr_win_rate"] = float(np.sum(differences > 0) + 0.5 * np.sum(differences == 0)) / num_images
            row["psnr_margin"], row["psnr_margin_ci95"] = margin_interval(differences)
            rows.append(row)
        return rows


def margin_interval(differences: np.ndarray, confidence: float = 0.95) -> tuple[float, list[float]]:
    """(mean, [low, high]) of per-image differences ``[N]`` (dB): the paired Student's t interval
    (``scipy.stats.ttest_1samp``); ``[nan, nan]`` when ``N < 2`` or a difference is infinite (an
    exact reconstruction on one side only: the mean is then infinite too), and the mean itself at
    both ends when every difference is the same."""
    differences = np.asarray(differences, np.float64)
    mean = float(np.mean(differences))
    if differences.size < 2 or not np.all(np.isfinite(differences)):
        return mean, [float("nan"), float("nan")]
    if np.all(differences == differences[0]):
        return mean, [mean, mean]
    interval = stats.ttest_1samp(differences, 0.0).confidence_interval(confidence)
    return mean, [float(interval.low), float(interval.high)]
