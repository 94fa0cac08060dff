"""DiT, the diffusion baseline (Peebles & Xie 2023), and the KL autoencoder whose latents it diffuses."""
