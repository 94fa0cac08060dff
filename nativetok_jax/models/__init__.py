"""The tokenizer models: NativeTok (MIT + causal experts) and the order-free TiTok baseline."""

from nativetok_jax.models.autoencoder import Autoencoder, NativeTok, TiTok, build_model

__all__ = ["Autoencoder", "NativeTok", "TiTok", "build_model"]
