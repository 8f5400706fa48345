"""Upcycling, expert allocation, the MoE layer, routing losses and checkpoint layouts.

Importing this package registers the package's own MoE class (``model_type: deltamoe``) with
transformers' Auto classes, so ``AutoModelForCausalLM.from_pretrained`` loads it without
``trust_remote_code``.
"""

from components.moe.modeling import register as _register

_register()
