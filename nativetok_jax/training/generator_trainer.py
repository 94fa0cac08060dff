"""The generator trainer: ``train_generator(config, workdir)``, read top to bottom.

Load the tokenizer the config names; encode the training and evaluation images once into token
stores (resumable, reused when present); build the generator on the mesh; decide how to
initialise (resume from this workdir's newest checkpoint, else start fresh); train with one
sharded, donated ``jax.jit`` step; on their schedules log, checkpoint, measure the held-out
negative log-likelihood (per token and per position), and write PNG grids of class-conditional
samples decoded by the tokenizer. SIGTERM saves and stops; rerunning resumes.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from nativetok_jax import checkpoints, sharding
from nativetok_jax.config import validate_generator
from nativetok_jax.data.sources import open_sources
from nativetok_jax.data.token_store import TokenSource
from nativetok_jax.evaluation.grids import save_grid
from nativetok_jax.generation.generate import generate_ids
from nativetok_jax.layers.partitioning import axis_rules
from nativetok_jax.models.generators import build_generator
from nativetok_jax.tokenizer import Tokenizer
from nativetok_jax.training import tensorboard
from nativetok_jax.training.guards import Preempted, Preemption, check_finite
from nativetok_jax.training.optimizer import ema_update, make_optimizer
from nativetok_jax.training.progress import ReportProgress
from nativetok_jax.training.state import init_state, state_shardings
from nativetok_jax.training.token_extraction import extract_tokens

Batch = dict[str, jax.Array]


def generator_loss(model: Any, kind: str, ids: jax.Array, labels: jax.Array, key: jax.Array | None,
                   label_drop_probability: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The generator's objective; ``key=None`` evaluates (no label dropout; MaskGIT needs a key)."""
    if kind == "ar":
        return model.next_token_loss(ids, labels, label_drop_key=key, label_drop_probability=label_drop_probability)
    return model.masked_token_loss(ids, labels, key=key, label_drop_probability=label_drop_probability)


def token_stores(config: ml_collections.ConfigDict, tokenizer: Tokenizer, workdir: str) -> tuple[TokenSource, TokenSource]:
    """The (train, eval) token stores, extracted now unless a finished matching store exists."""
    g, data = config.generator, config.data
    train_source, eval_source = open_sources(data, data.num_eval_images)
    num_classes = g.num_classes or getattr(train_source, "num_classes", 1)
    directory = g.tokens_dir or os.path.join(workdir, "tokens")
    description = dict(tokenizer=os.path.abspath(g.tokenizer), use_ema=g.use_ema, source=data.source,
                       path=data.path or data.tfds_name)
    train = extract_tokens(tokenizer, train_source, os.path.join(directory, "train"), data=data,
                           num_examples=g.num_train_examples or len(train_source), num_classes=num_classes,
                           seed=config.train.seed, description=description, batch_size=g.extract_batch_size)
    eval_data = ml_collections.ConfigDict(data.to_dict())
    if data.source != "photos":  # held-out images: centre crops, no flips
        eval_data.update(crop_min=1.0, crop_max=1.0, flip=False)
    else:
        eval_data.flip = False
    num_eval = g.num_eval_examples or min(data.num_eval_images, len(eval_source) * (data.num_eval_images if data.source == "photos" else 1))
    held_out = extract_tokens(tokenizer, eval_source, os.path.join(directory, "eval"), data=eval_data,
                              num_examples=num_eval, num_classes=num_classes, seed=config.train.seed + 1,
                              description=description, batch_size=g.extract_batch_size)
    return train, held_out


def token_iterator(source: TokenSource, batch_size: int, seed: int) -> grain.DatasetIterator:
    """Shuffled, repeated batches of this process's share ``{"ids": [b, L], "label": [b]}``."""
    dataset = grain.MapDataset.source(source)[jax.process_index()::jax.process_count()]
    dataset = dataset.seed(seed).shuffle().repeat().batch(batch_size, drop_remainder=True)
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))


def train_generator(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    validate_generator(config)
    g, train = config.generator, config.train
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_of(config)
    tokenizer = Tokenizer.from_checkpoint(g.tokenizer, use_ema=g.use_ema, mesh=mesh)
    train_tokens, eval_tokens = token_stores(config, tokenizer, workdir)
    num_classes = train_tokens.num_classes
    if is_main:
        checkpoints.write_config(workdir, config)
    logging.info("generator %s on %d x %d-token training examples (%d classes, vocabulary %d); %d held out",
                 g.kind, len(train_tokens), tokenizer.num_tokens, num_classes, tokenizer.codebook_size, len(eval_tokens))

    graphdef, params, param_shardings = sharding.init_sharded(
        lambda r: build_generator(g, vocab_size=tokenizer.codebook_size, num_tokens=tokenizer.num_tokens,
                                  num_classes=num_classes, rngs=r, dtype=config.model.dtype),
        train.seed, mesh, rules)
    optimizer = make_optimizer(train, train.num_steps, params)
    keep_ema = train.ema_decay > 0
    shardings = state_shardings(param_shardings, optimizer, params, mesh, keep_ema)
    state = jax.jit(lambda p: init_state(p, optimizer, keep_ema), out_shardings=shardings)(params)
    del params
    logging.info("generator parameters: %.2f M", sum(x.size for x in jax.tree.leaves(state["params"])) / 1e6)

    store = checkpoints.Checkpoints(checkpoints.checkpoint_directory(workdir), train.keep_checkpoints)
    iterator = token_iterator(train_tokens, train.batch_size // jax.process_count(), train.seed)
    latest = store.latest_step()
    if latest is not None:
        state = store.restore(latest, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                                   state, shardings), iterator)
        logging.info("resumed from %s at step %d", store.directory, latest)
    step = int(jax.device_get(state["step"]))

    ids_sharding = sharding.batch_sharding(mesh, (train.batch_size, tokenizer.num_tokens))
    labels_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(ids_sharding.spec[0]))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def train_step(state: dict[str, Any], batch: Batch) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        key = jax.random.fold_in(jax.random.key(train.seed), state["step"])

        def loss_fn(params):
            return generator_loss(nnx.merge(graphdef, params), g.kind, batch["ids"], batch["label"], key,
                                  g.label_drop_probability)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {k: v for k, v in metrics.items() if k != "nll_by_position"}
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))
        metrics.update(loss=loss, grad_norm=optax.tree.norm(grads), params_finite=finite.astype(jnp.float32))
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                "ema": ema_update(state["ema"], params, train.ema_decay) if state["ema"] else {}}, metrics

    step_fn = jax.jit(train_step, in_shardings=(shardings, {"ids": ids_sharding, "label": labels_sharding}),
                      out_shardings=(shardings, replicated), donate_argnums=0)
    evaluate = HeldOutLikelihood(graphdef, g, eval_tokens, mesh, rules)
    writer = tensorboard.create_writer(workdir, just_logging=not is_main)
    progress = ReportProgress(num_train_steps=train.num_steps, writer=writer, every_steps=train.log_every)
    preemption = Preemption()
    summary: dict[str, Any] = {}
    last_saved = latest
    try:
        while step < train.num_steps:
            batch = next(iterator)
            batch = {"ids": jax.make_array_from_process_local_data(ids_sharding, batch["ids"]),
                     "label": jax.make_array_from_process_local_data(labels_sharding, batch["label"])}
            with jax.set_mesh(mesh), axis_rules(rules):
                state, metrics = step_fn(state, batch)
            step += 1
            progress(step)
            last = step == train.num_steps
            log = step % train.log_every == 0 or last
            stop = step % train.log_every == 0 and preemption.agreed()
            save = step % train.checkpoint_every == 0 or last or stop
            if log or save:  # every logged or saved state is checked first
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                check_finite(values, step, store.directory, last_saved)
            if log:
                writer.write_scalars(step, values)
            if step % train.eval_every == 0 or last:
                with progress.timed("eval"):
                    summary = _evaluate(evaluate, state, tokenizer, graphdef, config, num_classes, step, workdir, writer)
            if save:
                store.save(step, state, iterator)
                last_saved = step
            if stop:
                raise Preempted(f"preempted at step {step}; checkpoint saved in {store.directory}")
        if not summary:
            summary = _evaluate(evaluate, state, tokenizer, graphdef, config, num_classes, step, workdir, writer)
    finally:
        preemption.restore()
        writer.flush()
        store.close()
    summary.update(step=step, num_train_examples=len(train_tokens), num_eval_examples=len(eval_tokens))
    if is_main:
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


class HeldOutLikelihood:
    """Mean NLL (nats per token) of the held-out token store, overall and per position.

    MaskGIT's "NLL" is its masked-token loss at random cosine masks drawn from a fixed seed (an
    estimate, comparable between checkpoints of one run), not a sequence likelihood.
    """

    def __init__(self, graphdef: nnx.GraphDef, generator: ml_collections.ConfigDict, tokens: TokenSource,
                 mesh: jax.sharding.Mesh, rules: sharding.Rules, batch_size: int = 64):
        self.ids, self.labels = tokens.arrays()
        self.batch_size = min(batch_size, len(self.ids))
        self.mesh, self.rules = mesh, rules
        kind = generator.kind

        @jax.jit
        def batch_nll(params, ids, labels, key):
            model = nnx.merge(graphdef, params)
            if kind == "ar":
                logits = model(ids, labels)
                log_probs = jax.nn.log_softmax(logits, axis=-1)
                return -jnp.take_along_axis(log_probs, ids[..., None], axis=-1)[..., 0]  # [B, L]
            loss, _ = model.masked_token_loss(ids, labels, key=key, label_drop_probability=0.0)
            return jnp.broadcast_to(loss, ids.shape)

        self._batch_nll = batch_nll

    def __call__(self, params: Any) -> dict[str, Any]:
        rows = []
        with jax.set_mesh(self.mesh), axis_rules(self.rules):
            for start in range(0, len(self.ids), self.batch_size):
                ids = self.ids[start : start + self.batch_size]
                labels = self.labels[start : start + self.batch_size]
                pad = self.batch_size - len(ids)
                ids = np.concatenate([ids, np.zeros((pad,) + ids.shape[1:], ids.dtype)])
                labels = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
                nll = np.asarray(self._batch_nll(params, ids, labels, jax.random.key(start)))[: self.batch_size - pad]
                rows.append(nll)
        nll = np.concatenate(rows)
        return dict(nll_per_token=float(nll.mean()), nll_by_position=nll.mean(0).tolist())


def _evaluate(evaluate: HeldOutLikelihood, state: dict[str, Any], tokenizer: Tokenizer, graphdef: nnx.GraphDef,
              config: ml_collections.ConfigDict, num_classes: int, step: int, workdir: str,
              writer: tensorboard.MetricWriter) -> dict[str, Any]:
    """Held-out NLL, and a PNG grid of samples (one row per class, cycling) decoded by the tokenizer."""
    params = state["ema"] if state["ema"] else state["params"]
    result = evaluate(params)
    writer.write_scalars(step, {"eval/nll_per_token": result["nll_per_token"]})
    s = config.generator.sample
    labels = np.arange(s.num_samples) % num_classes
    with jax.set_mesh(evaluate.mesh), axis_rules(evaluate.rules):
        ids = generate_ids(config.generator.kind, (graphdef, params), labels, jax.random.key(s.seed),
                           tokenizer.num_tokens, s)
    images = np.asarray(tokenizer.decode(np.asarray(ids)))
    if jax.process_index() == 0:
        os.makedirs(os.path.join(workdir, "images"), exist_ok=True)
        columns = int(np.ceil(np.sqrt(len(images))))
        rows = [images[i : i + columns] for i in range(0, len(images), columns)]
        upscale = max(1, 96 // tokenizer.image_size)
        grid = save_grid(os.path.join(workdir, "images", f"samples_{step:07d}.png"), rows, upscale=upscale)
        writer.write_images(step, {"samples": grid[None]})
    logging.info("step %d: held-out NLL %.4f nats/token", step, result["nll_per_token"])
    return result
