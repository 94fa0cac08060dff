"""``python -m nativetok_jax.convert NETWORK --out FILE.npz INPUT...``: pretrained weights, once.

Converts the public weight files of the networks the objectives and metrics use into the
project's own format (an ``.npz`` with a JSON header, read without pickle). Nothing is
downloaded: the inputs are files you already have.

    lpips          torchvision's vgg16-397923af.pth and LPIPS' lpips/weights/v0.1/vgg.pth
                   (or one whole lpips.LPIPS(net="vgg") state dict)
    inception      pytorch-fid's pt_inception-2015-12-05-6726825d.pth (the FID Inception)
    maskgit-vqgan  google-research/maskgit's tokenizer_imagenet256_checkpoint (Flax msgpack)
                   or the PyTorch port maskgit-vqgan-imagenet-f16-256.bin (TiTok's)
    sd-vae         stabilityai/sd-vae-ft-ema or sd-vae-ft-mse diffusion_pytorch_model.safetensors
                   (diffusers AutoencoderKL; DiT's latent space, scale 0.18215), or CompVis'
                   vae-ft-mse-840000-ema-pruned.safetensors / an SD checkpoint's first_stage_model
    dit            facebookresearch/DiT's DiT-XL-2-256x256.pt / -512x512.pt, or diffusers'
                   DiTTransformer2DModel diffusion_pytorch_model.safetensors (facebook/DiT-XL-2-256);
                   --out is a run directory that ``python -m nativetok_jax.sample --workdir`` reads
                   (--vae names the converted SD-VAE; --image_size for diffusers' files, default 256)
    titok          bytedance/1d-tokenizer's released TiTok-L-32 / B-64 / S-128 (tokenizer_titok_l32.bin, or
                   the Hugging Face model.safetensors); --out is a run directory that
                   ``python -m nativetok_jax.evaluate --workdir`` reads

PyTorch files are read with ``torch.load(weights_only=True)`` (PyTorch, CPU build, must be
installed for them); ``.safetensors`` inputs need no PyTorch.
"""

from __future__ import annotations

import argparse
import os
import sys

from nativetok_jax import storage
from nativetok_jax.config import ConfigError
from nativetok_jax.pretrained import files
from nativetok_jax.pretrained.dit import convert_dit
from nativetok_jax.pretrained.files import WeightsError
from nativetok_jax.pretrained.inception import convert_fid_inception
from nativetok_jax.pretrained.lpips import convert_lpips
from nativetok_jax.pretrained.maskgit_vqgan import convert_maskgit_vqgan
from nativetok_jax.pretrained.sd_vae import convert_sd_vae
from nativetok_jax.pretrained.titok import convert_titok

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion is host work; leave accelerators alone

NETWORKS = {
    "lpips": "1 or 2 inputs: [vgg16.pth] lpips_heads.pth",
    "inception": "1 input: pt_inception-2015-12-05-6726825d.pth",
    "maskgit-vqgan": "1 input: the maskgit Flax checkpoint or the PyTorch port's state dict",
    "sd-vae": "1 input: diffusers' AutoencoderKL diffusion_pytorch_model.safetensors (or CompVis' VAE file)",
    "dit": "1 input: DiT's DiT-XL-2-*.pt or diffusers' DiTTransformer2DModel safetensors; --out DIR",
    "titok": "1 input: a released TiTok tokenizer (tokenizer_titok_l32.bin or model.safetensors); --out DIR",
}


def convert(network: str, inputs: list[str], out: str, *, image_size: int | None = None,
            num_heads: int | None = None, vae: str = "") -> str:
    """Converts ``inputs`` into ``out``; returns a one-line summary. ``image_size``, ``num_heads`` and
    ``vae`` are the DiT converter's (:func:`nativetok_jax.pretrained.dit.convert_dit`)."""

    expected = (1, 2) if network == "lpips" else (1,)
    if len(inputs) not in expected:
        raise files.WeightsError(f"{network} takes {NETWORKS[network]}; got {len(inputs)} inputs")
    given = [name for name, value in (("--image_size", image_size), ("--num_heads", num_heads), ("--vae", vae)) if value]
    if given and network != "dit":
        raise files.WeightsError(f"{given[0]}: only the dit converter uses it")
    # dit and titok write a run directory, the rest one .npz; checked before the (large) weights are read.
    storage.check_writable(out, "--out", directory=network in ("dit", "titok"))
    if network == "dit":

        return convert_dit(inputs[0], out, image_size=image_size, num_heads=num_heads, vae=vae)
    if network == "titok":

        return convert_titok(inputs[0], out)
    if network == "lpips":

        vgg, heads = (None, inputs[0]) if len(inputs) == 1 else inputs
        convert_lpips(vgg, heads, out)
    elif network == "inception":

        convert_fid_inception(inputs[0], out)
    elif network == "sd-vae":

        convert_sd_vae(inputs[0], out)
    else:

        convert_maskgit_vqgan(inputs[0], out)
    arrays, meta = files.load_weights(out)
    count = sum(int(a.size) for a in arrays.values())
    return f"wrote {out}: {meta['kind']}, {len(arrays)} arrays, {count:,} parameters"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nativetok_jax.convert", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(f"  {name:14s} {inputs}" for name, inputs in NETWORKS.items()))
    parser.add_argument("network", choices=sorted(NETWORKS))
    parser.add_argument("inputs", nargs="+", help="the public weight file(s)")
    parser.add_argument("--out", required=True, help="the .npz file to write (dit, titok: the run directory)")
    parser.add_argument("--image_size", type=int, default=None,
                        help="dit: the image size in pixels (diffusers' files do not record it; default 256)")
    parser.add_argument("--num_heads", type=int, default=None,
                        help="dit: attention heads, for widths outside DiT's tables")
    parser.add_argument("--vae", default="", help="dit: the converted SD-VAE .npz the run directory names")
    args = parser.parse_args(argv)

    try:
        print(convert(args.network, args.inputs, args.out, image_size=args.image_size, num_heads=args.num_heads,
                      vae=args.vae))
    # A file or sizes (--image_size) that cannot make a model, or an --out that cannot be written.
    except (WeightsError, ConfigError, storage.OutputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
