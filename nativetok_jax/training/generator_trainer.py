"""The generator trainer: ``train_generator(config, workdir)``, read top to bottom.

Load the tokenizer the config names; encode the training and evaluation images once into token
stores (resumable, reused when present); build the generator on the mesh; decide how to
initialise (resume from this workdir's newest checkpoint, else start fresh); train with one
sharded, donated ``jax.jit`` step; on their schedules log, checkpoint, measure the held-out
negative log-likelihood (per token and per position; every held-out crop's per-token NLLs in
``DIR/held_out_nll.npz``), and write PNG grids of class-conditional samples decoded by the
tokenizer. ``generator.token_order.permutation`` lets the generator read the ids in another order
(``data/token_order.py``): the stores stay in the tokenizer's order, the reader permutes, and
samples are put back in the tokenizer's order before they are decoded. SIGTERM saves and stops; rerunning resumes. The loop, the step
and the state builder are the tokenizer's (``training/loop.py``); what is here is the loss, the
token data and the evaluation.
"""

from __future__ import annotations

from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from nativetok_jax import checkpoints, sharding, storage
from nativetok_jax.config import ConfigError, validate_generator
from nativetok_jax.data.pipeline import held_out_section, shuffled_forever
from nativetok_jax.data.sources import describe_data, open_sources
from nativetok_jax.data.token_order import reading_order, to_tokenizer_order, token_permutation
from nativetok_jax.data.token_store import TokenSource
from nativetok_jax.generation.generate import generate_ids
from nativetok_jax.layers.partitioning import axis_rules
from nativetok_jax.models.generators.build import build_generator, validate_sampling
from nativetok_jax.tokenizer import Tokenizer
from nativetok_jax.training import loop
from nativetok_jax.training.loop import Task
from nativetok_jax.training.state import BuiltState, build_state
from nativetok_jax.training.step import Objective, StepContext, batch_shardings
from nativetok_jax.training.token_extraction import extract_tokens
from nativetok_jax.workdir import record_upstream, write_config

Batch = dict[str, jax.Array]
HELD_OUT_NLL = "held_out_nll.npz"  # "nll": float32 [num_eval_examples, L], the last evaluation's per-token NLLs


def generator_loss(model: Any, kind: str, ids: jax.Array, labels: jax.Array, key: jax.Array | None,
                   label_drop_probability: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The generator's objective; ``key=None`` evaluates (no label dropout; MaskGIT needs a key)."""
    if kind == "ar":
        return model.next_token_loss(ids, labels, label_drop_key=key, label_drop_probability=label_drop_probability)
    return model.masked_token_loss(ids, labels, key=key, label_drop_probability=label_drop_probability)


def build_generator_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules: sharding.Rules, *,
                          vocab_size: int, num_tokens: int, num_classes: int) -> BuiltState:
    """The generator of ``config.generator`` over a tokenizer's ``vocab_size`` ids and ``num_tokens``
    positions, with its optimiser and EMA on ``mesh`` (``state.build_state``)."""
    g = config.generator
    return build_state(
        lambda r: build_generator(g, vocab_size=vocab_size, num_tokens=num_tokens, num_classes=num_classes,
                                  rngs=r, dtype=g.dtype),
        train=config.train, mesh=mesh, rules=rules)


def generator_objective(graphdef: nnx.GraphDef, generator: ml_collections.ConfigDict) -> Objective:
    """The training objective of ``generator`` (``config.generator``) on batches ``{"ids": int32
    [B, L], "label": int32 [B]}``: next-token (``kind="ar"``) or masked-token cross-entropy."""

    def loss(params: Any, batch: Batch, context: StepContext):
        loss, metrics = generator_loss(nnx.merge(graphdef, params), generator.kind, batch["ids"], batch["label"],
                                       context.key, generator.label_drop_probability)
        return loss, ({k: v for k, v in metrics.items() if k != "nll_by_position"}, None)

    return Objective(loss)


def generator_batch_shardings(mesh: jax.sharding.Mesh, batch_size: int,
                              num_tokens: int) -> dict[str, jax.sharding.NamedSharding]:
    return batch_shardings(mesh, {"ids": (batch_size, num_tokens), "label": (batch_size,)})


def token_stores(config: ml_collections.ConfigDict, tokenizer: Tokenizer, workdir: epath.PathLike,
                 sources: tuple[Any, Any] | None = None) -> tuple[TokenSource, TokenSource]:
    """The (train, eval) token stores of ``sources`` (default: ``config.data``'s), extracted now
    unless a finished matching store exists."""
    g, data = config.generator, config.data
    train_source, eval_source = open_sources(data, data.num_eval_images) if sources is None else sources
    data_classes = int(getattr(train_source, "num_classes", 1))
    if g.num_classes and data_classes > g.num_classes:  # labels past the table would read the null class's row
        raise ConfigError(f"config.generator.num_classes: {g.num_classes}, but the data has {data_classes} classes")
    num_classes = g.num_classes or data_classes
    directory = epath.Path(g.tokens_dir) if g.tokens_dir else epath.Path(workdir) / "tokens"
    description = dict(tokenizer=str(storage.path(g.tokenizer)), use_ema=g.use_ema, source=data.source,
                       path=data.path or data.tfds_name)
    description.update(tokenizer_upstream(g.tokenizer))  # a store of another checkpoint's ids is not reused
    train = extract_tokens(tokenizer, train_source, directory / "train", data=data,
                           num_examples=g.num_train_examples or len(train_source), num_classes=num_classes,
                           seed=config.train.seed, description=description, batch_size=g.extract_batch_size)
    eval_data, num_eval, seed = held_out_crops(config, eval_source)
    held_out = extract_tokens(tokenizer, eval_source, directory / "eval", data=eval_data,
                              num_examples=num_eval, num_classes=num_classes, seed=seed,
                              description=description, batch_size=g.extract_batch_size)
    return train, held_out


def held_out_crops(config: ml_collections.ConfigDict, eval_source: Any) -> tuple[ml_collections.ConfigDict, int, int]:
    """How the held-out token store crops ``eval_source``: ``(data, num_examples, seed)`` for
    ``token_extraction.example_image`` (example ``i`` is ``example_image(eval_source, i, data,
    image_size, seed, ...)``). Centre crops without flips, except for the bundled photographs
    (few and large), which are cropped as for training at the held-out scale
    (``data.pipeline.held_out_section``), unflipped, from ``train.seed + 1``."""
    data, g = config.data, config.generator
    eval_data = held_out_section(data)  # at the held-out scale, as the tokenizer's own evaluations
    num_eval = g.num_eval_examples or min(data.num_eval_images, len(eval_source) * (data.num_eval_images if data.source == "photos" else 1))
    return eval_data, num_eval, config.train.seed + 1


def token_iterator(source: TokenSource, batch_size: int, seed: int) -> grain.DatasetIterator:
    """Shuffled, repeated batches of this process's share ``{"ids": [b, L], "label": [b]}``."""
    dataset = grain.MapDataset.source(source)[jax.process_index()::jax.process_count()]
    dataset = shuffled_forever(dataset, seed).batch(batch_size, drop_remainder=True)
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))


def tokenizer_upstream(tokenizer: str) -> dict[str, Any]:
    """What identifies the trained tokenizer a generator models the ids of, beyond its workdir: the
    training stage its newest checkpoint belongs to ("" for a one-stage run) and that checkpoint's
    step (a tokenizer trained further gives other ids for the same images; HNT stages count their
    steps from 0, so a later stage reaches the same step with another model). Recorded by
    :func:`workdir.record_upstream` and in the token stores' description."""
    directory = checkpoints.final_stage_directory(tokenizer)
    stage = "" if directory == storage.path(tokenizer) else directory.name
    return {"tokenizer stage": stage, "tokenizer step": checkpoints.latest_step(directory)}


def train_generator(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict[str, Any]:
    """Trains the generator ``config`` describes in ``workdir``; returns the final evaluation."""
    validate_generator(config)
    # Sampling settings bounded by the tokenizer's vocabulary (a MaskGIT top_k past it), checked
    # now rather than at the first evaluation, after the token extraction.
    tokenizer_config = checkpoints.read_config(checkpoints.final_stage_directory(config.generator.tokenizer))
    validate_sampling(config.generator.sample, config.generator.kind,
                      vocab_size=tokenizer_config.model.quantizer.codebook_size)
    # The tokenizer as an absolute path (a URL as it is): config.json and the token stores then name
    # the same run whatever directory a later command (sample, evaluate, a resume) runs in.
    config = config.copy_and_resolve_references()
    config.generator.tokenizer = str(storage.path(config.generator.tokenizer))
    g, train = config.generator, config.train
    workdir = epath.Path(workdir)
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_of(config)
    record_upstream(workdir, tokenizer_upstream(g.tokenizer), is_main=is_main)
    tokenizer = Tokenizer.from_checkpoint(g.tokenizer, use_ema=g.use_ema, mesh=mesh)
    order = g.token_order.permutation
    sources = open_sources(config.data, config.data.num_eval_images)
    train_tokens, eval_tokens = (reading_order(s, order) for s in token_stores(config, tokenizer, workdir, sources))
    num_classes = train_tokens.num_classes
    if is_main:
        write_config(workdir, config)
    logging.info("generator %s on %d x %d-token training examples (%d classes, vocabulary %d); %d held out",
                 g.kind, len(train_tokens), tokenizer.num_tokens, num_classes, tokenizer.codebook_size, len(eval_tokens))

    built = build_generator_state(config, mesh, rules, vocab_size=tokenizer.codebook_size,
                                  num_tokens=tokenizer.num_tokens, num_classes=num_classes)
    graphdef = built.graphdef
    logging.info("generator parameters: %.2f M", sum(x.size for x in jax.tree.leaves(built.state["params"])) / 1e6)
    held_out = HeldOutLikelihood(graphdef, g, eval_tokens, mesh, rules)
    save_nll = workdir / HELD_OUT_NLL if is_main else None
    task = Task(
        built, generator_objective(graphdef, g),
        batches=token_iterator(train_tokens, train.batch_size // jax.process_count(), train.seed),
        batch_shardings=generator_batch_shardings(mesh, train.batch_size, tokenizer.num_tokens),
        evaluate=lambda state, step, outputs: _evaluate(held_out, state, tokenizer, graphdef, config, num_classes,
                                                        step, outputs, save_nll),
        name="generator",
    )
    result = loop.run(task, train, workdir)
    summary = dict(result.metrics, step=result.step, num_train_examples=len(train_tokens),
                   num_eval_examples=len(eval_tokens), data=describe_data(config.data, *sources),
                   token_order=dict(permutation=order, positions=token_permutation(order, tokenizer.num_tokens).tolist()))
    loop.write_summary(workdir, summary)
    return summary


class HeldOutLikelihood:
    """Mean NLL (nats per token) of the held-out token store, overall and per position; every
    crop's per-token NLLs from :meth:`per_token` (rows in the store's order, so two generators on
    stores of the same crops are paired crop by crop).

    MaskGIT's "NLL" is each crop's masked-token loss at a random cosine mask drawn from
    ``fold_in(key(seed), crop index)`` (an estimate, comparable between checkpoints of one run and
    independent of ``batch_size``), not a sequence likelihood.
    """

    def __init__(self, graphdef: nnx.GraphDef, generator: ml_collections.ConfigDict, tokens: TokenSource,
                 mesh: jax.sharding.Mesh, rules: sharding.Rules, batch_size: int = 64, seed: int = 0):
        self.ids, self.labels = tokens.arrays()
        self.batch_size = min(batch_size, len(self.ids))
        self.mesh, self.rules = mesh, rules
        kind = generator.kind

        @jax.jit
        def batch_nll(params, ids, labels, indices):
            model = nnx.merge(graphdef, params)
            if kind == "ar":
                logits = model(ids, labels)
                log_probs = jax.nn.log_softmax(logits, axis=-1)
                return -jnp.take_along_axis(log_probs, ids[..., None], axis=-1)[..., 0]  # [B, L]
            # Crop i's masks from fold_in(key(seed), i): the same whatever the evaluation batch.
            keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(indices)
            return jnp.broadcast_to(model.example_masked_nll(ids, labels, keys)[:, None], ids.shape)

        self._batch_nll = batch_nll

    def per_token(self, params: Any) -> np.ndarray:
        """float32 ``[num_eval_examples, L]``: each held-out crop's NLL (nats) at each position
        (for MaskGIT the crop's masked-token loss, repeated along the row)."""
        rows = []
        with jax.set_mesh(self.mesh), axis_rules(self.rules):
            for start in range(0, len(self.ids), self.batch_size):
                ids = self.ids[start : start + self.batch_size]
                labels = self.labels[start : start + self.batch_size]
                pad = self.batch_size - len(ids)
                ids = np.concatenate([ids, np.zeros((pad,) + ids.shape[1:], ids.dtype)])
                labels = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
                # The batch spans every process's devices: each process needs all of it.
                indices = np.arange(start, start + self.batch_size, dtype=np.int32)
                nll = multihost_utils.process_allgather(self._batch_nll(params, ids, labels, indices), tiled=True)
                nll = np.asarray(nll)[: self.batch_size - pad]
                rows.append(nll)
        return np.concatenate(rows).astype(np.float32)

    def __call__(self, params: Any) -> dict[str, Any]:
        nll = self.per_token(params)
        return dict(nll_per_token=float(nll.mean()), nll_by_position=nll.mean(0).tolist(), per_token=nll)


def _evaluate(evaluate: HeldOutLikelihood, state: dict[str, Any], tokenizer: Tokenizer, graphdef: nnx.GraphDef,
              config: ml_collections.ConfigDict, num_classes: int, step: int, outputs: loop.Outputs,
              save_nll: epath.Path | None = None) -> dict[str, Any]:
    """Held-out NLL (every crop's per-token NLLs written to ``save_nll``), and a PNG grid of
    samples (one row per class, cycling) decoded by the tokenizer, in the tokenizer's order."""
    params = loop.evaluation_params(state)
    result = evaluate(params)
    per_token = result.pop("per_token")
    if save_nll is not None:
        storage.write_npz(save_nll, nll=per_token)
    s = config.generator.sample
    labels = np.arange(s.num_samples) % num_classes
    with jax.set_mesh(evaluate.mesh), axis_rules(evaluate.rules):
        ids = generate_ids(config.generator.kind, (graphdef, params), labels, jax.random.key(s.seed),
                           tokenizer.num_tokens, s)
    ids = np.asarray(multihost_utils.process_allgather(ids, tiled=True))
    permutation = token_permutation(config.generator.token_order.permutation, tokenizer.num_tokens)
    images = np.asarray(tokenizer.decode(to_tokenizer_order(ids, permutation)))
    columns = int(np.ceil(np.sqrt(len(images))))
    rows = [images[i : i + columns] for i in range(0, len(images), columns)]
    outputs.grid("samples", step, rows, upscale=max(1, 96 // tokenizer.image_size))
    logging.info("step %d: held-out NLL %.4f nats/token", step, result["nll_per_token"])
    return result
