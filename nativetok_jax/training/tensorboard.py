"""TensorBoard event files with or without TensorFlow.

Every run writes TensorBoard events into its workdir. clu's default writer (log lines plus an
asynchronous TensorFlow summary writer) is used when TensorFlow is installed. TensorFlow is an
optional extra (``pip install 'nativetok_jax[tensorflow]'``): a 1.3 GB install that the models
never use. Without it, ``clu.metric_writers`` cannot even be imported (its package imports
TensorFlow), so :class:`EventFileWriter` writes the same scalars, images, texts, histograms and
hyperparameters through tensorboardX (protobuf only) and logs scalars as clu's ``LoggingWriter``
does. Both produce ``events.out.tfevents.*`` files in ``logdir`` that ``tensorboard --logdir``
and ``tensorboard.backend.event_processing`` read.

    writer = create_writer(workdir, just_logging=jax.process_index() > 0)
    writer.write_scalars(step, {"loss": 0.1})
    writer.flush()
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

# clu.metric_writers.MetricWriter when TensorFlow is installed, else EventFileWriter: both have
# write_scalars / write_images / write_texts / write_histograms / write_hparams / flush / close.
MetricWriter = Any


def create_writer(logdir: str | os.PathLike[str], *, just_logging: bool = False) -> MetricWriter:
    """A metric writer for ``logdir``: clu's default writer when TensorFlow imports, else
    :class:`EventFileWriter`. ``just_logging`` (processes other than 0) writes no event files."""
    try:
        from clu import metric_writers  # imports TensorFlow
    except ImportError as error:
        logging.info("TensorBoard events through tensorboardX (clu's writer needs TensorFlow: %s)", error)
        return EventFileWriter(None if just_logging else logdir)
    return metric_writers.create_default_writer(os.fspath(logdir), just_logging=just_logging)


def _scalar(value: Any) -> float:
    return float(np.asarray(value))


class EventFileWriter:
    """clu's ``MetricWriter`` methods over tensorboardX, which needs no TensorFlow.

    Scalars are logged (``[step] name=value, ...``, as clu's ``LoggingWriter``) and written as
    TensorBoard scalars; images are uint8 or float in [0, 1], ``[H, W, C]`` or ``[N, H, W, C]``
    (C = 1 or 3); ``logdir=None`` only logs. Events are written by tensorboardX's background
    thread, at the latest every 30 s; ``close`` writes everything still queued.
    """

    def __init__(self, logdir: str | os.PathLike[str] | None):
        self._writer = None
        if logdir is not None:
            from tensorboardX import SummaryWriter

            # gs:// and other remote paths are handed to tensorboardX's own file systems.
            self._writer = SummaryWriter(logdir=os.fspath(logdir), flush_secs=30)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        values = {key: _scalar(value) for key, value in scalars.items()}
        logging.info("[%d] %s", step, ", ".join(f"{key}={value:.6g}" for key, value in values.items()))
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, value, global_step=step)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        if self._writer is None:
            return
        for key, value in images.items():
            array = np.asarray(value)
            if array.ndim == 3:
                array = array[None]
            if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
                raise ValueError(f"write_images: {key!r} must be [N, H, W, C] or [H, W, C], got {array.shape}")
            self._writer.add_images(key, array, global_step=step, dataformats="NHWC")

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        if self._writer is None:
            return
        for key, value in texts.items():
            self._writer.add_text(key, value, global_step=step)

    def write_histograms(self, step: int, arrays: Mapping[str, Any],
                         num_buckets: Mapping[str, int] | None = None) -> None:
        if self._writer is None:
            return
        for key, value in arrays.items():
            bins = (num_buckets or {}).get(key)
            self._writer.add_histogram(key, np.asarray(value), global_step=step, max_bins=bins)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        logging.info("hparams: %s", ", ".join(f"{key}={value}" for key, value in hparams.items()))
        if self._writer is None:
            return
        from tensorboardX.summary import hparams as hparams_summary

        # Into this run's own event file (SummaryWriter.add_hparams would start a sub-run).
        allowed = (bool, int, float, str)
        values = {k: (v if isinstance(v, allowed) else str(v)) for k, v in hparams.items()}
        file_writer = self._writer._get_file_writer()
        for summary in hparams_summary(values, {}):
            file_writer.add_summary(summary)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
