"""nativetok_jax: NativeTok (native visual tokenization) in JAX/Flax.

``from nativetok_jax import Tokenizer`` is the public entry to the tokenizer; the layout of the
package follows the architecture: ``layers`` (building blocks) <- ``models`` (the tokenizers)
<- ``tokenizer`` (the public API) <- entry points (``main``, ``bench``).
"""

from nativetok_jax.tokenizer import Tokenizer

__all__ = ["Tokenizer"]
__version__ = "0.1.0"
