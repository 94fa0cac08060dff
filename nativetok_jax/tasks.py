"""The task registry: one entry per kind of training run (a config's ``task``), naming everything
the commands do with it. Adding a task is one :class:`Task` in :data:`TASKS`.

=========  =====================  ================================================  ========================
task       what it trains         trainer (``main``)                                export kind / class
=========  =====================  ================================================  ========================
tokenizer  NativeTok or TiTok     ``training.trainer.train_and_evaluate`` (HNT)     tokenizer / ``Tokenizer``
generator  AR or MaskGIT on ids   ``training.generator_trainer.train_generator``    generator / ``TrainedGenerator``
diffusion  DiT on VAE latents     ``training.diffusion_trainer.train_diffusion``    dit / ``TrainedDiT``
dvae       D²iT's Dynamic VAE     ``training.dvae_trainer.train_dvae``              dvae / ``DVAE``
d2it       D²iT's transformers    ``training.d2it_trainer.train_d2it``              d2it / ``TrainedD2iT``
=========  =====================  ================================================  ========================

Who asks: ``main`` (:attr:`Task.train`, :meth:`Task.summary`), ``sample`` (:attr:`Task.sample`),
``evaluate --workdir`` (:attr:`Task.evaluate`), ``pretrained.export`` (:attr:`Task.export`,
:attr:`Task.export_kind`), ``workdir`` (:attr:`Task.title`, :meth:`Task.describe`,
:attr:`Task.staged`, :meth:`Task.abstract_model`) and the benchmarks (:attr:`Task.bench`). No
other module branches on a task's name.

Layering: this module sits below the trainers, pipelines and model classes (they import
``workdir``, which asks it), so it imports only ``config``, ``checkpoints`` and the model builders,
and names the parts above it by import path (``"package.module:attribute"``), resolved when a
command asks (:meth:`Task.load`), as big_vision names its models. Importing them here would make
every trainer import every other one and close a circle through ``workdir``;
tests/test_tasks.py resolves every named part.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import ml_collections
from flax import nnx

from nativetok_jax import checkpoints
from nativetok_jax.config import (
    ConfigError,
    d2it_latent_shape,
    validate_d2it,
    validate_dit,
    validate_dvae,
    validate_dvae_model,
    validate_generator,
    validate_model,
    validate_training,
)
from nativetok_jax.models.nativetok import build_model
from nativetok_jax.models.dit.transformer import dit_from_config
from nativetok_jax.models.d2it.dvae import build_dvae
from nativetok_jax.models.d2it.dynamic_diffusion_transformer import dynamic_diffusion_transformer_from_config
from nativetok_jax.models.generators.build import build_generator

DEFAULT_TASK = "tokenizer"  # a config without a ``task`` field (every run written before there were others)
GENERATOR_NAMES = {"ar": "AR", "maskgit": "MaskGIT"}  # config.generator.kind in messages


@dataclasses.dataclass(frozen=True)
class Task:
    """One kind of training run.

    Attributes:
      name: ``config.task``.
      title: what messages call it (``"DiT"``).
      validate: raises ``ConfigError`` naming the first field of a run config that cannot work.
      model: ``(config, saved, rngs) -> nnx.Module``, the model whose parameters the run's
        checkpoints hold (``saved``: the stored parameter shapes, ``{"a/b": shape-like}``, for
        sizes only the data fixes); ``workdir`` builds it under ``nnx.eval_shape`` (nothing
        allocated) to compare shapes.
      train: ``"module:function"``, ``function(config, workdir) -> summary dict`` (``main``).
      summary_line: ``(summary, workdir) -> str``, what ``main`` prints after the run.
      export: ``"module:Class"`` with ``from_checkpoint(workdir, use_ema=)`` and ``save_pretrained``.
      export_kind: the ``kind`` of its exported directory (``pretrained.directory.KINDS``).
      sample: ``"module:function"``, ``function(workdir, out, flags) -> str`` (the line printed) of
        the ``sample`` command's flags (a dict), or ``None`` for a run that is not sampled.
      evaluate: ``"module:Class"`` that ``evaluate --workdir`` loads (``from_checkpoint``), or
        ``None`` for a run judged by its samples.
      staged: whether its config may train in Hierarchical Native Training stages, one
        directory each (``config.hnt.stages``).
      bench: ``"module:attribute"`` of its benchmark parts (``bench.diffusion``), or ``None``.
      detail: ``config -> (what, detail)`` for :meth:`describe`, or ``None``: the title.
    """

    name: str
    title: str
    validate: Callable[[ml_collections.ConfigDict], None]
    model: Callable[[ml_collections.ConfigDict, dict[str, Any], nnx.Rngs], nnx.Module]
    train: str
    summary_line: Callable[[dict[str, Any], str], str]
    export: str
    export_kind: str
    sample: str | None = None
    evaluate: str | None = None
    staged: bool = False
    bench: str | None = None
    detail: Callable[[ml_collections.ConfigDict], tuple[str, str]] | None = None

    def load(self, part: str) -> Any:
        """The object the part ``part`` (``"train"``, ``"sample"``, ...) names, imported now."""
        target = getattr(self, part)
        if target is None:
            raise ConfigError(f"task {self.name!r} has no {part}")
        module, _, attribute = target.partition(":")
        return getattr(importlib.import_module(module), attribute)

    def describe(self, config: ml_collections.ConfigDict) -> str:
        """``"an AR generator run (task 'generator')"``, ``"an HNT tokenizer run (2 stages, task
        'tokenizer')"``: what a run's config makes of its directory."""
        what, detail = self.detail(config) if self.detail else (self.title, "")
        article = "an" if what[0] in "AEHIOU" else "a"  # "an AR", "an HNT", "a DiT"
        return f"{article} {what} run ({detail}task {self.name!r})"

    def abstract_model(self, config: ml_collections.ConfigDict, saved: dict[str, Any]) -> nnx.Module:
        """The run's model as shapes (``nnx.eval_shape``: nothing allocated or compiled)."""
        return nnx.eval_shape(lambda: self.model(config, saved, nnx.Rngs(0)))


# ------------------------------------------------------------------------------------- the models

def _tokenizer_model(config, saved, rngs):
    validate_model(config.model)
    return build_model(config.model, rngs)


def _generator_model(config, saved, rngs):
    validate_generator(config)
    g = config.generator
    tokenizer = checkpoints.read_config(checkpoints.final_stage_directory(g.tokenizer)).model
    # 0 classes means "as many as the data has": the checkpoint's count is the data's.
    num_classes = g.num_classes or (saved["class_embedding"].shape[0] - 1 if "class_embedding" in saved else 1)
    return build_generator(g, vocab_size=tokenizer.quantizer.codebook_size, num_tokens=tokenizer.num_tokens,
                           num_classes=num_classes, rngs=rngs, dtype=g.dtype)


def _dit_model(config, saved, rngs):
    return dit_from_config(config.model, rngs)  # validates the model section


def _dvae_model(config, saved, rngs):
    validate_dvae_model(config.model)
    return build_dvae(config.model, rngs)


def _d2it_model(config, saved, rngs):
    regions = d2it_latent_shape(config.model)[0] // 2  # one region per 2 x 2 fine cells
    return dynamic_diffusion_transformer_from_config(config, (regions, regions), rngs)


# ------------------------------------------------------------------------------ the summary lines

def _eps_mse(summary: dict[str, Any]) -> str:
    return ", ".join(f"t={k[len('eps_mse_t'):]} {v:.4f}" for k, v in summary.items() if k.startswith("eps_mse_t"))


def _tokenizer_line(summary: dict[str, Any], workdir: str) -> str:
    baselines = ", ".join(f"{k[len('baseline_psnr_'):]} {v:.2f} dB" for k, v in summary.items()
                          if k.startswith("baseline_psnr_"))
    colour = f", the first {summary['colour_ids']} the mean colour" if summary.get("colour_ids") else ""
    return (f"held-out PSNR {summary['psnr']:.2f} dB with {summary['num_tokens']} tokens{colour} (baselines: {baselines}); "
            f"outputs in {workdir}")


def _generator_line(summary: dict[str, Any], workdir: str) -> str:
    return (f"held-out NLL {summary['nll_per_token']:.4f} nats/token after {summary['step']} steps; samples in "
            f"{workdir}/images")


def _dit_line(summary: dict[str, Any], workdir: str) -> str:
    return f"held-out eps-MSE {_eps_mse(summary)} after {summary['step']} steps; samples in {workdir}/images"


def _dvae_line(summary: dict[str, Any], workdir: str) -> str:
    return (f"held-out PSNR {summary['psnr']:.2f} dB (block means of its routing {summary['block_mean_psnr']:.2f} dB "
            f"at the same {summary['codes_per_image']:.1f} codes), fine fraction {summary['train_fine_fraction']:.3f} "
            f"on training crops, latent scale {summary['latent_scale']:.4f}; outputs in {workdir}")


def _d2it_line(summary: dict[str, Any], workdir: str) -> str:
    return (f"held-out eps-MSE {_eps_mse(summary)}, grain NLL {summary['grain_nll']:.4f} nats/region after "
            f"{summary['step']} steps; samples with grain maps in {workdir}/images")


# ---------------------------------------------------------------------------------- descriptions

def _tokenizer_detail(config: ml_collections.ConfigDict) -> tuple[str, str]:
    if (config.get("hnt", {}) or {}).get("stages"):
        return "HNT tokenizer", f"{len(config.hnt.stages)} stages, "
    return "tokenizer", ""


def _generator_detail(config: ml_collections.ConfigDict) -> tuple[str, str]:
    kind = config.generator.kind
    return f"{GENERATOR_NAMES.get(kind, kind)} generator", ""


# ------------------------------------------------------------------------------------ the registry

TASKS: dict[str, Task] = {task.name: task for task in (
    Task("tokenizer", "tokenizer", validate_training, _tokenizer_model,
         train="nativetok_jax.training.trainer:train_and_evaluate", summary_line=_tokenizer_line,
         export="nativetok_jax.tokenizer:Tokenizer", export_kind="tokenizer",
         evaluate="nativetok_jax.tokenizer:Tokenizer", staged=True, bench="nativetok_jax.bench.aot:TOKENIZER",
         detail=_tokenizer_detail),
    Task("generator", "generator", validate_generator, _generator_model,
         train="nativetok_jax.training.generator_trainer:train_generator", summary_line=_generator_line,
         export="nativetok_jax.generation.pretrained:TrainedGenerator", export_kind="generator",
         sample="nativetok_jax.sample:sample_generator_command", bench="nativetok_jax.bench.aot:GENERATOR",
         detail=_generator_detail),
    Task("diffusion", "DiT", validate_dit, _dit_model,
         train="nativetok_jax.training.diffusion_trainer:train_diffusion", summary_line=_dit_line,
         export="nativetok_jax.generation.diffusion_models:TrainedDiT", export_kind="dit",
         sample="nativetok_jax.sample:sample_diffusion_command", bench="nativetok_jax.bench.diffusion:DIT"),
    Task("dvae", "DVAE", validate_dvae, _dvae_model,
         train="nativetok_jax.training.dvae_trainer:train_dvae", summary_line=_dvae_line,
         export="nativetok_jax.dvae:DVAE", export_kind="dvae", evaluate="nativetok_jax.dvae:DVAE",
         bench="nativetok_jax.bench.aot:DVAE"),
    Task("d2it", "D²iT", validate_d2it, _d2it_model,
         train="nativetok_jax.training.d2it_trainer:train_d2it", summary_line=_d2it_line,
         export="nativetok_jax.generation.diffusion_models:TrainedD2iT", export_kind="d2it",
         sample="nativetok_jax.sample:sample_d2it_command", bench="nativetok_jax.bench.diffusion:D2IT"),
)}


def task_name(config: ml_collections.ConfigDict) -> str:
    """``config.task``; :data:`DEFAULT_TASK` for configs written before the field existed."""
    return config.get("task", DEFAULT_TASK)


def of(config: ml_collections.ConfigDict) -> Task:
    """The entry of ``config.task``.

    Raises:
      ConfigError: a task no entry names (``"config.task: must be one of ..., got 'x'"``).
    """
    name = task_name(config)
    if name not in TASKS:
        raise ConfigError(f"config.task: must be one of {tuple(TASKS)}, got {name!r}")
    return TASKS[name]


def with_part(part: str) -> tuple[str, ...]:
    """The names of the tasks that have ``part`` (``"sample"``: the sampled ones), in registry order."""
    return tuple(name for name, task in TASKS.items() if getattr(task, part) is not None)
