"""Gaussian diffusion as DiT trains and samples it: schedules, the forward and reverse processes,
the training loss, timestep respacing, DDPM / DDIM samplers and classifier-free guidance."""
