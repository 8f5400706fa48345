"""Which output class can compute exactly what a dense config computes.

A standard MoE class is chosen only when it expresses every config feature of the dense model
that changes the computation; what it cannot express sends the model to the package's own class
(:mod:`components.moe.modeling`, the dense family's own modules around the MoE blocks, so exact
by construction). Without this, a Llama with ``attention_bias: true`` became a Mixtral that
silently ignored every bias (logits off by up to 3.3). The facts below are transformers 5.23's
modeling code, and the exactness test in ``tests/reliability/test_model_integrity.py`` checks
each of them per family:

- attention biases: Llama's ``attention_bias`` (q/k/v/o); Mixtral has none, Qwen3-MoE has the
  same switch, Qwen2 always has q/k/v biases and Qwen2-MoE has them with ``qkv_bias``.
- sliding windows: Llama ignores ``sliding_window``; Mistral and Mixtral apply it on every layer;
  Qwen2, Qwen3 and Qwen2-MoE apply it on the layers ``layer_types`` marks; Qwen3-MoE on every
  layer (so a Qwen3 that slides on some layers only needs the own class).
- rotary embeddings: every class reads ``rope_parameters`` through the same initialisers, so the
  dense config's normalised parameters are written as they are (a legacy ``rope_scaling`` is
  converted by the dense config class, not re-interpreted by another).
- ``mlp_bias`` (Llama): no standard MoE class has biased experts; the own class's experts are
  the dense family's MLP modules, biases included.

:func:`check_output_keys` is the backstop for anything this list misses: before a tensor is
written, the chosen class is built on the meta device and its attention, norm, embedding and
head parameters must be exactly those the dense checkpoint provides.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from components.moe.families import Family, UnknownTensorError, tensor_role

Windows = Literal["none", "uniform", "per_layer"]
# how each class applies ``sliding_window`` (see the module docstring)
WINDOWS: dict[str, Windows] = {"llama": "none", "mistral": "uniform", "qwen2": "per_layer",
                               "qwen3": "per_layer", "mixtral": "uniform",
                               "qwen2_moe": "per_layer", "qwen3_moe": "uniform"}
# attention biases each standard MoE class can hold: the config switch that turns them on
ATTENTION_BIAS_SWITCH: dict[str, str | None] = {"mixtral": None, "qwen2_moe": "qkv_bias",
                                                "qwen3_moe": "attention_bias"}


class IncompatibleConfigError(ValueError):
    """A dense config feature no output class can express: the message names the field."""


def normalised(dense_cfg: dict[str, Any]) -> Any:
    """The dense config as its own transformers class reads it (defaults filled, ``layer_types``
    derived, legacy rope fields converted)."""
    from transformers import AutoConfig

    fields = {k: v for k, v in dense_cfg.items() if k not in ("model_type", "auto_map")}
    try:
        return AutoConfig.for_model(str(dense_cfg["model_type"]), **fields)
    except (ValueError, TypeError, KeyError) as err:
        raise IncompatibleConfigError(f"config.json: transformers cannot read it ({err})"
                                      ) from None


def layer_windows(config: Any, model_type: str) -> list[int | None]:
    """The attention window of every layer (None: full attention) of a ``model_type`` model."""
    layers = int(config.num_hidden_layers)
    window = getattr(config, "sliding_window", None) or None
    rule = WINDOWS[model_type]
    if rule == "none" or window is None:
        return [None] * layers
    if rule == "uniform":
        return [window] * layers
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * layers
    return [window if kind == "sliding_attention" else None for kind in kinds]


def _attention_bias(config: Any) -> bool:
    if config.model_type == "qwen2":
        return True  # Qwen2Attention: q/k/v always biased
    return bool(getattr(config, "attention_bias", False))


def standard_gaps(family: Family, dense_cfg: dict[str, Any]) -> list[str]:
    """Why the family's standard MoE class cannot compute what the dense model computes (empty:
    it can, with :func:`standard_fields` written into its config)."""
    config = normalised(dense_cfg)
    gaps = []
    if _attention_bias(config) and ATTENTION_BIAS_SWITCH[family.moe_type] is None:
        gaps.append(f"attention biases ({family.architecture} has none)")
    if getattr(config, "mlp_bias", False):
        gaps.append(f"FFN biases ({family.architecture}'s experts have none)")
    windows = layer_windows(config, config.model_type)
    if WINDOWS[family.moe_type] == "uniform" and len(set(windows)) > 1:
        sliding = [i for i, w in enumerate(windows) if w is not None]
        gaps.append(f"a sliding window on layers {sliding} only ({family.architecture} slides "
                    "on every layer or none)")
    return gaps


def standard_fields(family: Family, dense_cfg: dict[str, Any]) -> dict[str, Any]:
    """Config fields that make the standard class compute what the dense config does: the
    attention window per layer, attention biases, and the normalised rotary parameters."""
    config = normalised(dense_cfg)
    windows = layer_windows(config, config.model_type)
    fields: dict[str, Any] = {"rope_parameters": config.rope_parameters}
    window = next((w for w in windows if w is not None), None)
    fields["sliding_window"] = window
    if family.moe_type != "mixtral":  # the Qwen classes switch the window on separately
        fields["use_sliding_window"] = window is not None
    if WINDOWS[family.moe_type] == "per_layer":
        fields["layer_types"] = ["sliding_attention" if w is not None else "full_attention"
                                 for w in windows]
    switch = ATTENTION_BIAS_SWITCH[family.moe_type]
    if switch is not None:
        fields[switch] = _attention_bias(config)
    return fields


def _compared(key: str) -> bool:
    """Attention, norms, embeddings and head: the tensors the upcycler copies unchanged."""
    if key.endswith("rotary_emb.inv_freq"):  # a buffer older checkpoints saved; never loaded
        return False
    try:
        role = tensor_role(key)
    except UnknownTensorError:
        return True  # a parameter no layout explains is a difference to report
    return role.kind == "shared" and role.part != "mlp"


def check_output_keys(out_cfg: dict[str, Any], dense_keys: Iterable[str]) -> None:
    """Build the output class on the meta device (no memory, no weights) and compare its shared
    parameters with the dense checkpoint's: a bias, norm or head the class lacks would be an
    unexpected key on load (silently dropped), one it has and the checkpoint lacks a missing key
    (initialised at random). Raises :class:`IncompatibleConfigError` naming them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import components.moe.modeling  # noqa: F401  (registers the own class)

    fields = {k: v for k, v in out_cfg.items() if k != "model_type"}
    config = AutoConfig.for_model(str(out_cfg["model_type"]), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = {k for k in model.state_dict() if _compared(k)}
    given = {k for k in dense_keys if _compared(k)}
    if getattr(config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")
        given.discard("lm_head.weight")
    dropped, absent = sorted(given - expected), sorted(expected - given)
    if dropped or absent:
        parts = ([f"it has no {', '.join(dropped[:3])}"] if dropped else []) + \
                ([f"it needs {', '.join(absent[:3])}, which the dense checkpoint lacks"]
                 if absent else [])
        raise IncompatibleConfigError(f"{out_cfg.get('architectures', ['?'])[0]} cannot hold "
                                      f"this model: {'; '.join(parts)}")
