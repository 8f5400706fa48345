"""Upcycling, expert allocation, the MoE layer, routing losses and checkpoint layouts.

The package's own MoE class (``model_type: deltamoe``) is registered with transformers' Auto
classes by :func:`components.moe.modeling.register` (idempotent), which every loader of upcycled
models calls first, so ``AutoModelForCausalLM.from_pretrained`` loads it without
``trust_remote_code``. The package itself imports nothing, so :mod:`.families` (the registry of
model families) stays light for the run config.
"""
