"""Pretrained networks loaded from files the user names (never downloaded).

Foreign weight files (PyTorch state dicts, safetensors, Flax msgpack checkpoints) are converted
once into the project's own format, an ``.npz`` of named arrays plus a JSON header (see
:mod:`nativetok_jax.pretrained.files`); the training and evaluation code only reads that format.
"""
