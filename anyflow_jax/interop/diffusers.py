"""Alias of :mod:`anyflow_jax.checkpoints.diffusers` (checkpoint I/O moved to ``anyflow_jax.checkpoints``): ``anyflow_jax.interop.diffusers`` keeps working for existing code."""
import sys

from anyflow_jax.checkpoints import diffusers as _module
from anyflow_jax.checkpoints import lora as _lora

# LoRA interop (merged export, PEFT adapter files) next to load_transformer / save_transformer
for _name in ("save_merged_transformer", "save_peft_adapter", "load_peft_adapter", "peft_state_dict"):
    setattr(_module, _name, getattr(_lora, _name))

sys.modules[__name__] = _module
