"""nativetok_jax: NativeTok (native 1D visual tokenization, with AR and MaskGIT generators on its
tokens) and D²iT (a Dynamic VAE and a Dynamic Diffusion Transformer), with DiT as the diffusion
baseline, in JAX / Flax NNX.

``from nativetok_jax import Tokenizer`` is the tokenizer's public entry; ``nativetok_jax.dvae.DVAE``
the Dynamic VAE's; the samplers behind ``python -m nativetok_jax.sample`` the generators'. Imports
point one way (README "Layout"): ``layers`` <- ``models`` (a folder per system) <- ``diffusion`` /
``data`` <- ``training``, ``generation``, ``evaluation`` <- the entry points (``main``, ``sample``,
``evaluate``, ``convert``, ``bench``).
"""

from nativetok_jax.tokenizer import Tokenizer

__all__ = ["Tokenizer"]
__version__ = "0.1.0"
