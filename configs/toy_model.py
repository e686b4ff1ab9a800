"""The embedded default toy Wan DiT alone (moving digits, CPU-sized).

Run: python -m anyflow_jax.demo   (a forward-pass tour of this model: export to diffusers format,
load as teacher and as flow-map student, check the diagonal r = t, take a few flow-map jumps).
Needs: nothing (random weights). Training configs for every stage: configs/toy.py.
"""
from anyflow_jax.defaults import toy_model_config


def get_config(arg=None):
    del arg
    return toy_model_config()
