"""The networks, one folder per system (each module says which paper section it implements).

- ``nativetok/``: NativeTok's tokenizer (the Meta Image Transformer, the causal experts, the
  quantiser, the decoder, the proxy-code head) and the order-free TiTok encoder it is compared with.
- ``generators/``: the second-stage generators over tokenizer ids (LlamaGen-style GPT, MaskGIT).
- ``dit/``: DiT, the diffusion baseline, and the KL autoencoder (SD-VAE) whose latents it diffuses.
- ``d2it/``: D²iT's Dynamic VAE with its grain router, and the Dynamic Diffusion Transformer (the
  grain transformer and the content transformer).
- ``frozen/``: pretrained networks the project only runs: InceptionV3 (FID), LPIPS and MaskGIT's
  VQGAN (the proxy codes; its convolution blocks are shared by the DVAE and the KL autoencoder).
- ``discriminator.py`` (the adversarial losses' PatchGAN) and ``pixels.py`` (the pixel range)
  serve several systems.
"""
