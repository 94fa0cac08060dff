"""D²iT (arXiv 2504.09454): the Dynamic VAE with its grain router, and the Dynamic Diffusion Transformer."""
