"""The training configs, importable as ``nativetok_jax.configs`` once the package is installed
(setup.py maps this folder there). This file makes it a regular package: an editable install's
finder maps only regular packages below ``nativetok_jax``, so without it
``import nativetok_jax.configs`` failed there."""
