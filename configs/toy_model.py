"""The embedded default toy Wan DiT (moving digits, CPU-sized).

Run: python -m anyflow_jax.demo   (a forward-pass tour of this model; training configs for every
stage arrive with `python -m anyflow_jax.train`).
Needs: nothing (random weights).
"""
from anyflow_jax.defaults import toy_model_config


def get_config(arg=None):
    del arg
    return toy_model_config()
