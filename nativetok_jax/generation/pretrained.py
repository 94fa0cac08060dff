"""A trained generator with the tokenizer whose ids it models: class labels in, ids and images out.

    generator = TrainedGenerator.from_checkpoint("workdirs/gen_demo")   # a training workdir
    generator.save_pretrained("exported/gen_demo")                      # config.json + model.safetensors,
    generator = TrainedGenerator.from_pretrained("exported/gen_demo")   # its tokenizer in tokenizer/
    ids = generator.sample_ids(labels, jax.random.key(0))               # int32 [B, num_tokens]
    images = generator.tokenizer.decode(ids)                            # uint8 [B, H, W, 3]

Parameters live on the config's mesh, sharded by its rules, like the tokenizer's.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from nativetok_jax import checkpoints, sharding, storage
from nativetok_jax.data.token_order import to_tokenizer_order, token_permutation
from nativetok_jax.generation.generate import generate_ids
from nativetok_jax.layers.partitioning import axis_rules
from nativetok_jax.models.generators.build import build_generator
from nativetok_jax.pretrained import directory as pretrained_directory
from nativetok_jax.tokenizer import Tokenizer
from nativetok_jax.training import generator_trainer
from nativetok_jax.workdir import check_upstream

TOKENIZER_DIRECTORY = "tokenizer"


def _abstract_generator(config: ml_collections.ConfigDict, tokenizer: Tokenizer, num_classes: int) -> nnx.Module:
    return nnx.eval_shape(lambda: build_generator(
        config.generator, vocab_size=tokenizer.codebook_size, num_tokens=tokenizer.num_tokens,
        num_classes=num_classes, rngs=nnx.Rngs(0), dtype=config.generator.dtype))


@functools.partial(jax.jit, static_argnums=0)
def _teacher_forced_logits(graphdef: nnx.GraphDef, params: sharding.Params, ids: jax.Array, labels: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params)(ids, labels)


class TrainedGenerator:
    """An AR or MaskGIT generator (``config.generator``), its parameters and its tokenizer."""

    def __init__(self, config: ml_collections.ConfigDict, params: sharding.Params, tokenizer: Tokenizer,
                 step: int | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.step = step  # the checkpoint's training step; None when loaded from an export
        self.num_classes = int(np.shape(params["class_embedding"])[0]) - 1  # the last row: the null class
        mesh, rules = tokenizer.mesh, sharding.rules_of(config)
        abstract = _abstract_generator(config, tokenizer, self.num_classes)
        self.graphdef, _ = nnx.split(abstract)
        problems = sharding.mismatches(sharding.params_of(abstract), params)
        if problems:
            raise ValueError(f"parameters do not fit this generator: {sharding.summarize(problems)}")
        self.params = jax.device_put(params, sharding.param_shardings(abstract, mesh, rules))
        self._rules = rules

    @classmethod
    def from_checkpoint(cls, workdir: str, *, use_ema: bool = True) -> TrainedGenerator:
        """The newest checkpoint of a generator's training workdir (EMA weights when kept) and the
        tokenizer its config names. Raises ``ConfigError`` when that tokenizer was trained further
        since the generator learned its ids (``workdir.check_upstream``)."""
        config = checkpoints.read_config(workdir)
        g = config.generator
        check_upstream(workdir, generator_trainer.tokenizer_upstream(g.tokenizer), "loading it")
        tokenizer = Tokenizer.from_checkpoint(g.tokenizer, use_ema=g.use_ema, mesh=sharding.make_mesh(config.mesh))
        # Straight into their shardings (by logical axes, which do not depend on the class count).
        axes = sharding.param_axes(_abstract_generator(config, tokenizer, 1))
        params, step = checkpoints.load_params(workdir, use_ema=use_ema, placement=sharding.restore_placement(
            axes, tokenizer.mesh, sharding.rules_of(config)))
        return cls(config, params, tokenizer, step)

    @classmethod
    def from_pretrained(cls, directory: str) -> TrainedGenerator:
        """What :meth:`save_pretrained` wrote: no orbax checkpoint, no run directory."""
        config, params, _ = pretrained_directory.load_pretrained(directory, kind="generator")
        tokenizer = Tokenizer.from_pretrained(storage.path(directory) / TOKENIZER_DIRECTORY,
                                              mesh=sharding.make_mesh(config.mesh))
        return cls(config, params, tokenizer)

    def save_pretrained(self, directory: str) -> None:
        """``directory/config.json`` and ``model.safetensors`` for the generator, and its tokenizer
        in ``directory/tokenizer/``: a self-contained model to sample from."""
        pretrained_directory.save_pretrained(directory, kind="generator", config=self.config, params=self.params,
                               num_classes=self.num_classes, num_tokens=self.tokenizer.num_tokens,
                               vocab_size=self.tokenizer.codebook_size)
        self.tokenizer.save_pretrained(storage.path(directory) / TOKENIZER_DIRECTORY)

    @property
    def kind(self) -> str:
        return self.config.generator.kind

    def logits(self, ids: Any, labels: Any) -> jax.Array:
        """Teacher-forced logits ``[B, num_tokens, vocab]`` for ids ``[B, num_tokens]`` and labels ``[B]``
        (the AR model's next-token logits; MaskGIT's for each position as given). Ids and logits
        are in the generator's reading order (``generator.token_order``), as it was trained."""
        mesh = self.tokenizer.mesh
        ids, labels = (jax.device_put(a, sharding.batch_sharding(mesh, a.shape))
                       for a in (np.asarray(ids, np.int32), np.asarray(labels, np.int32)))
        with jax.set_mesh(mesh), axis_rules(self._rules):
            return _teacher_forced_logits(self.graphdef, self.params, ids, labels)

    def sample_ids(self, labels: Any, key: jax.Array, settings: ml_collections.ConfigDict | None = None) -> jax.Array:
        """Token ids ``[B, num_tokens]`` for class ``labels [B]`` with ``settings`` (default: the
        config's ``generator.sample``: temperature, top-k/p, guidance, MaskGIT steps), in the
        tokenizer's order (a generator that reads another ``generator.token_order`` has its
        samples put back), so ``self.tokenizer.decode(ids)`` gives the images."""
        settings = self.config.generator.sample if settings is None else settings
        with jax.set_mesh(self.tokenizer.mesh), axis_rules(self._rules):
            ids = generate_ids(self.kind, (self.graphdef, self.params), labels, key, self.tokenizer.num_tokens,
                               settings)
        return to_tokenizer_order(ids, token_permutation(self.config.generator.token_order.permutation,
                                                         self.tokenizer.num_tokens))
