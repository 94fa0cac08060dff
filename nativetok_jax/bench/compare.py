"""``python -m nativetok_jax.bench compare``: our train step against the authors' PyTorch prototype.

For each token count L it times, in one process and at the same sizes, one training step (forward,
backward, gradient clipping, AdamW) of

- ours: the config's real train step (``training/state.build_state`` and the shared tokenizer
  step, as ``bench train`` times it), and
- theirs, one of two:

  - ``--prototype DIR``: the authors' own code, imported from a local checkout of the public
    repository wangbei1/order_1-d (nothing of it is kept in this project): ``modeling/blocks_new.py``'s
    ``TiTokEncoder`` (a Python loop over the experts, expert ``i`` on ``[X ; t_0 .. t_{i-1} ; q_i]``)
    and ``TiTokDecoder``, with ``modeling/quantizer.py``'s l2-normalised ``VectorQuantizer`` between
    them and the learned latent tokens ``TiTok_new`` holds (``modeling/titok_new.py``). Our decoder
    gets their head's hidden layer (``decoder.head_hidden = 2 x width``, tanh). The parameter counts
    then differ by their decoder's output layer (1024 VQGAN-code logits per cell against our 3 p^2
    pixel values: 213,824 more on their side at the prototype's sizes) and otherwise by under 0.1 %
    (checked to 1 %; the run stops otherwise); the report gives the count of each part on both sides
    and names what differs (``differences``).
  - otherwise a stand-in written in this project from the paper's description (``torch_prototype``):
    the same computation with exactly our parameters. It is 1.75x slower than the authors' code at
    L = 32 (issue 26), so quote only ``--prototype`` figures.

The two are timed interleaved (one step of each per repetition, medians over repetitions), so load
from other processes disturbs both alike; the ratio is their step time over ours (> 1: we are
faster). A 2048 x 2048 float32 matrix product is timed before and after (``matmul_gflops_per_s``)
to show what the machine delivered.

Default sizes are the prototype's benchmark: 64 px images, 8 px patches, MIT 256 x 6 layers /
4 heads, experts 128 x 2 layers / 4 heads, decoder 128 x 8 layers / 8 heads, batch 8.
``--tiny`` runs a seconds-long size (for the test suite). ``--dtype bfloat16`` computes in
bfloat16 (ours: ``model.dtype``; PyTorch: autocast), parameters staying float32 in both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from nativetok_jax import storage
from nativetok_jax.bench import peer
from nativetok_jax.bench.model import write_json
from nativetok_jax.bench.train import _compiled_step, matmul_flops_per_second
from nativetok_jax.config import base_config

PROTOTYPE = dict(image_size=64, patch_size=8, encoder=(256, 6, 4), experts=(128, 2, 4), decoder=(128, 8, 8))
TINY = dict(image_size=16, patch_size=8, encoder=(32, 1, 2), experts=(16, 2, 2), decoder=(32, 1, 2))
# The seconds-long size that the authors' modules can build (their head counts and decoder depth
# come from named model sizes: bench/peer.py).
TINY_PROTOTYPE = dict(image_size=16, patch_size=8, encoder=(32, 1, 4), experts=(16, 2, 4), decoder=(16, 8, 8))


def compare_config(sizes: dict[str, Any], num_tokens: int, dtype: str, chunks: int | None,
                   head_hidden: int = 0) -> ml_collections.ConfigDict:
    """The tokenizer config of these sizes, trained as the PyTorch step is: pixel L2 + quantiser
    loss, no prefix dropout, no EMA (the prototype keeps none in its step), one device;
    ``head_hidden`` is ``model.decoder.head_hidden`` (the authors' decoder head has ``2 x width``)."""
    config = base_config()
    m = config.model
    m.image_size, m.patch_size, m.num_tokens, m.dtype = sizes["image_size"], sizes["patch_size"], num_tokens, dtype
    for name in ("encoder", "experts", "decoder"):
        width, depth, heads = sizes[name]
        m[name].update(width=width, depth=depth, num_heads=heads)
    if chunks is not None:
        m.experts.chunks = chunks
    m.decoder.head_hidden = head_hidden
    config.train.prefix_probability = 0.0
    config.train.ema_decay = 0.0
    config.mesh.update(data=-1, fsdp=1, model=1)
    return config


def torch_prototype(config: ml_collections.ConfigDict):
    """The prototype's tokenizer in eager PyTorch, with the same parameters as ours (see the module
    docstring). Returns the ``nn.Module``; ``module(images)`` gives the training loss."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, width: int, heads: int, mlp_ratio: float):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
            self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
            hidden = int(width * mlp_ratio)
            self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

        def forward(self, x):
            h = self.norm1(x)
            x = x + self.attention(h, h, h, need_weights=False)[0]
            return x + self.mlp(self.norm2(x))

    def blocks(cfg):
        return nn.Sequential(*[Block(cfg.width, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])

    def vector(*shape):
        return nn.Parameter(torch.randn(*shape))

    class Expert(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.query, self.slot_position = vector(cfg.width), vector(cfg.width)
            self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
            self.blocks = blocks(cfg)

        def forward(self, x_latent, prior):
            q = self.query.expand(x_latent.shape[0], 1, -1)
            return self.blocks(self.norm(torch.cat([x_latent, prior, q], dim=1)))[:, -1]

    class Prototype(nn.Module):
        def __init__(self, m):
            super().__init__()
            e, x, d, q = m.encoder, m.experts, m.decoder, m.quantizer
            self.p, self.grid = m.patch_size, m.image_size // m.patch_size
            patch_dim, num_rows = m.patch_size**2 * 3, self.grid**2 + 1
            self.patch_embedding = nn.Linear(patch_dim, e.width)
            self.class_token, self.position = vector(e.width), vector(num_rows, e.width)
            self.mit = blocks(e)
            self.mit_norm = nn.LayerNorm(e.width, eps=1e-6)
            self.dimension_switcher = nn.Linear(e.width, x.width)
            self.experts = nn.ModuleList([Expert(x) for _ in range(m.num_tokens)])
            self.token_norm = nn.LayerNorm(x.width, eps=1e-6)
            self.token_projection = nn.Linear(x.width, q.token_dim)
            self.codebook = vector(q.codebook_size, q.token_dim)
            self.commitment_weight = q.commitment_weight
            self.token_embedding = nn.Linear(q.token_dim, d.width)
            self.token_position = vector(m.num_tokens, d.width)
            self.hidden_token, self.decoder_class, self.patch_token = vector(d.width), vector(d.width), vector(d.width)
            self.grid_position = vector(num_rows, d.width)
            self.decoder_in, self.decoder_out = nn.LayerNorm(d.width, eps=1e-6), nn.LayerNorm(d.width, eps=1e-6)
            self.decoder = blocks(d)
            self.head = nn.Linear(d.width, patch_dim)

        def patchify(self, images):  # [B, H, W, 3] -> [B, N, p*p*3]
            b, p, g = images.shape[0], self.p, self.grid
            return images.reshape(b, g, p, g, p, 3).permute(0, 1, 3, 2, 4, 5).reshape(b, g * g, p * p * 3)

        def forward(self, images):
            b = images.shape[0]
            patches = self.patchify(images)
            x = torch.cat([self.class_token.expand(b, 1, -1), self.patch_embedding(patches)], dim=1) + self.position
            x_latent = self.dimension_switcher(self.mit_norm(self.mit(x)))
            tokens, prior = [], x_latent[:, :0]
            for expert in self.experts:  # the prototype's loop: expert i on its unpadded sequence
                token = expert(x_latent, prior)
                tokens.append(token)
                prior = torch.cat([prior, (token + expert.slot_position)[:, None]], dim=1)
            z = nn.functional.normalize(self.token_projection(self.token_norm(torch.stack(tokens, 1))).float(), dim=-1)
            codebook = nn.functional.normalize(self.codebook, dim=-1)
            codes = codebook[torch.argmax(z @ codebook.T, dim=-1)]
            quantizer_loss = ((codes - z.detach()) ** 2).mean() + self.commitment_weight * ((z - codes.detach()) ** 2).mean()
            t = self.token_embedding(z + (codes - z).detach()) + self.token_position
            grid = torch.cat([self.decoder_class[None], self.patch_token.expand(self.grid**2, -1)]) + self.grid_position
            h = self.decoder_out(self.decoder(self.decoder_in(torch.cat([grid.expand(b, -1, -1), t], dim=1))))
            reconstruction = self.head(h[:, 1 : 1 + self.grid**2]).float()
            return ((reconstruction - patches) ** 2).mean() + quantizer_loss

    return Prototype(config.model)


def torch_step(config: ml_collections.ConfigDict, batch_size: int, device: str, dtype: str) -> dict[str, Any]:
    """The stand-in's step (``bench.peer.training_step``): ``dict(step, params)``."""
    import torch  # a development dependency (see bench/peer.py)


    model = torch_prototype(config).to(device)
    size = config.model.image_size
    images = torch.rand(batch_size, size, size, 3, device=device) * 2 - 1
    return dict(step=peer.training_step(model, lambda: model(images), config.train, device, dtype),
                params=sum(p.numel() for p in model.parameters()))


def params_by_part(params) -> dict[str, int]:
    """Our parameter counts by the model's top-level parts (``mit``, ``experts``, ...)."""
    return {str(name): sum(int(np.prod(x.shape)) for x in jax.tree.leaves(sub)) for name, sub in params.items()}


# The most the two sides' parameter counts may differ by (a fraction of ours) once the decoders'
# output layers are set aside (ours: pixels, the authors': 1024 code logits; bench/peer.py
# head_difference): the stand-in's agree exactly, the authors' code by 0.07 % (L = 32) and 0.09 %
# (L = 128) at the prototype's sizes.
PARAMETER_TOLERANCE = 0.01


def measure(config: ml_collections.ConfigDict, batch_size: int, repeats: int, opponent) -> dict[str, Any]:
    """Compiles ours, builds theirs with ``opponent(config, our params by part)`` (a dict with
    ``step`` and ``params``, and with the prototype ``params_by_part`` and ``differences``), warms
    both up, then times them interleaved.

    Raises:
      RuntimeError: the parameter counts differ by more than ``PARAMETER_TOLERANCE`` (besides the
        decoders' output layers, ``head_difference``).
    """
    start = time.perf_counter()
    compiled, state, batch, _ = _compiled_step(config, batch_size, (), 0)
    compile_s = time.perf_counter() - start
    ours_parts = params_by_part(state["params"])
    ours_params = sum(ours_parts.values())
    theirs = opponent(config, ours_parts)
    torch_run, torch_params = theirs.pop("step"), theirs.pop("params")
    if abs(ours_params - torch_params - theirs.get("head_difference", 0)) > PARAMETER_TOLERANCE * ours_params:
        raise RuntimeError(f"parameter counts differ by more than {PARAMETER_TOLERANCE:.0%} (output layers aside: "
                           f"{theirs.get('head_difference', 0):+,}): ours {ours_params:,}, PyTorch {torch_params:,}")

    def ours_run():
        nonlocal state
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)

    ours_run(), torch_run()  # warm-up
    ours, others = [], []
    for _ in range(repeats):
        for run, times in ((ours_run, ours), (torch_run, others)):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    ours_s, torch_s = statistics.median(ours), statistics.median(others)
    return dict(ours_step_s=ours_s, torch_step_s=torch_s, speedup=torch_s / ours_s, ours_compile_s=compile_s,
                ours_params=ours_params, torch_params=torch_params, **theirs)


COLUMNS = (  # key, title, format
    ("num_tokens", "L", "{:>5d}"),
    ("dtype", "dtype", "{:>9s}"),
    ("chunks", "chunks", "{:>6d}"),
    ("torch_ms", "PyTorch ms", "{:>11.1f}"),
    ("ours_ms", "ours ms", "{:>9.1f}"),
    ("speedup", "PyTorch/ours", "{:>13.2f}"),
    ("compile_s", "compile s", "{:>10.2f}"),
    ("ours_params_m", "ours M", "{:>8.3f}"),
    ("torch_params_m", "PyTorch M", "{:>10.3f}"),
)


def format_row(row: dict[str, Any]) -> str:
    values = dict(row, torch_ms=row["torch_step_s"] * 1e3, ours_ms=row["ours_step_s"] * 1e3,
                  compile_s=row["ours_compile_s"], ours_params_m=row["ours_params"] / 1e6,
                  torch_params_m=row["torch_params"] / 1e6)
    return " ".join(fmt.format(values[key]) for key, _, fmt in COLUMNS)


def format_header() -> str:
    widths = [len(fmt.format(0 if "d}" in fmt or "f}" in fmt else "")) for _, _, fmt in COLUMNS]
    return " ".join(title.rjust(w) for (_, title, _), w in zip(COLUMNS, widths))


def override_field(config: ml_collections.ConfigDict, assignment: str) -> None:
    """Sets ``FIELD=VALUE`` (``model.experts.remat=True``: a Python literal; a bare word in a string
    field) in a config field that exists.

    Raises:
      SystemExit: the config has no such field (one line naming it).
    """
    import ast

    key, _, value = assignment.partition("=")
    *parents, field = key.split(".")
    node = config
    for parent in parents:
        if not isinstance(node, ml_collections.ConfigDict) or parent not in node:
            raise SystemExit(f"error: --set {key}: the config has no such field")
        node = node[parent]
    if not isinstance(node, ml_collections.ConfigDict) or field not in node:
        raise SystemExit(f"error: --set {key}: the config has no such field")
    try:
        node[field] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        if not isinstance(node[field], str):  # a bare word is a string only where a string belongs
            raise SystemExit(f"error: --set {key}={value}: not a Python literal") from None
        node[field] = value


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m nativetok_jax.bench compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prototype", default="", metavar="DIR",
                        help="a local checkout of github.com/wangbei1/order_1-d: time the authors' own code "
                             "(default: this project's stand-in, not to be quoted)")
    parser.add_argument("--tokens", default="32,128", help="comma-separated token counts")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of each, interleaved, after a warm-up")
    parser.add_argument("--dtypes", default="float32", help="comma-separated compute dtypes: float32,bfloat16")
    parser.add_argument("--chunks", type=int, default=None, help="model.experts.chunks (default: the config's)")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long size instead of the prototype's")
    parser.add_argument("--torch_device", default="", help="cpu or cuda (default: cuda when JAX runs on a GPU)")
    parser.add_argument("--torch_threads", type=int, default=0,
                        help="PyTorch CPU threads (default: every core, as XLA:CPU uses); on a machine "
                             "shared with other jobs, PyTorch's spinning OpenMP threads slow down far more "
                             "than XLA's, so compare there with 1 thread or not at all")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field of our config, e.g. model.experts.remat=False (repeatable)")
    parser.add_argument("--out", default="bench_results/compare.json")
    args = parser.parse_args(argv)
    storage.check_writable(args.out, "--out")  # in seconds, not after the runs it is to hold

    import torch  # a development dependency (see bench/peer.py)


    modules = peer.load(args.prototype) if args.prototype else None  # one-line errors before anything compiles
    device = args.torch_device or ("cuda" if jax.default_backend() == "gpu" else "cpu")
    if device == "cpu":
        torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)  # the cores XLA:CPU uses too
    if modules:
        sizes = TINY_PROTOTYPE if args.tiny else PROTOTYPE
        head_hidden = 2 * sizes["decoder"][0]  # their decoder head's hidden width

        def opponent(config, ours_parts):
            return peer.opponent(modules, config, args.batch_size, device, config.model.dtype, ours_parts)
    else:
        sizes, head_hidden = (TINY if args.tiny else PROTOTYPE), 0

        def opponent(config, ours_parts):
            del ours_parts  # the stand-in mirrors ours module for module: its total is the check
            return torch_step(config, args.batch_size, device, config.model.dtype)

    configs = []
    for dtype in args.dtypes.split(","):
        for num_tokens in (int(t) for t in args.tokens.split(",")):
            config = compare_config(sizes, num_tokens, dtype, args.chunks, head_hidden)
            for assignment in args.set:
                override_field(config, assignment)
            if modules:
                peer.size_names(config.model)  # sizes their code cannot build: a one-line error now
            configs.append((dtype, num_tokens, config))
    report: dict[str, Any] = dict(
        benchmark="compare", opponent="prototype" if modules else "stand-in",
        prototype_dir=args.prototype or None, prototype_commit=peer.commit_of(args.prototype) if modules else None,
        sizes=dict(sizes), batch_size=args.batch_size, device=jax.devices()[0].device_kind,
        jax_backend=jax.default_backend(), torch_device=device, torch_threads=torch.get_num_threads(),
        jax_version=jax.__version__, torch_version=torch.__version__,
        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None, overrides=list(args.set),
        matmul_gflops_per_s=[matmul_flops_per_second(jax.numpy.float32) / 1e9], rows=[])
    opponent_name = (f"the authors' prototype ({args.prototype}, commit {report['prototype_commit']})" if modules
                     else "this project's stand-in of the prototype (not the authors' code: quote --prototype only)")
    print(f"ours: JAX {jax.__version__} on {report['device']}; theirs: {opponent_name}, PyTorch {torch.__version__} "
          f"eager on {device} ({report['torch_threads']} threads); load average {report['load_average']}; "
          f"a 2048 x 2048 float32 matmul: {report['matmul_gflops_per_s'][0]:.1f} GFLOP/s")
    print(format_header())
    for dtype, num_tokens, config in configs:
        row = dict(num_tokens=num_tokens, dtype=dtype, chunks=config.model.experts.chunks,
                   **measure(config, args.batch_size, args.repeats, opponent))
        report["rows"].append(row)
        print(format_row(row), flush=True)
        write_json(args.out, report)  # after every row: a long run keeps what it measured
    report["matmul_gflops_per_s"].append(matmul_flops_per_second(jax.numpy.float32) / 1e9)
    report["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(f"a 2048 x 2048 float32 matmul after the runs: {report['matmul_gflops_per_s'][1]:.1f} GFLOP/s; load "
          f"average {report['load_average_after']}")
    for line in report["rows"][-1].get("differences", []) if report["rows"] else []:
        print(f"differs (L = {report['rows'][-1]['num_tokens']}): {line}")
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return report
