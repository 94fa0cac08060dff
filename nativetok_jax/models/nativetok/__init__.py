"""NativeTok's tokenizer (MIT + causal experts, Sec. 3) and the order-free TiTok baseline."""

from nativetok_jax.models.nativetok.autoencoder import Autoencoder, NativeTok, TiTok, build_model, colour_id_count, id_count

__all__ = ["Autoencoder", "NativeTok", "TiTok", "build_model", "colour_id_count", "id_count"]
