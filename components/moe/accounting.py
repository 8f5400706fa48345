"""Parameter and FLOPs accounting for a dense model and its upcycled MoE.

Later stages need these numbers: the FLOPs-matched dense baseline trains on a token budget scaled
by the MoE's active/dense compute ratio. Forward FLOPs per token follow Kaplan et al. (2020):
2 × (parameters used in matrix multiplies) + 2 × n_layers × n_ctx × d_attn for attention scores.
The input embedding is a lookup (no FLOPs); a tied output head still multiplies, so it counts.
Training costs about 3× the forward pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Accounting:
    dense_parameters: int
    moe_parameters: int
    active_parameters: int
    dense_flops_per_token: int
    active_flops_per_token: int
    seq_len: int

    @property
    def active_ratio(self) -> float:
        """MoE forward FLOPs per token ÷ the dense model's: the FLOPs-matched token scale."""
        return self.active_flops_per_token / self.dense_flops_per_token

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "active_ratio": self.active_ratio,
                "moe_train_flops_per_token": 3 * self.active_flops_per_token,
                "dense_train_flops_per_token": 3 * self.dense_flops_per_token}

    def metrics(self, prefix: str = "upcycle") -> dict[str, float]:
        return {f"{prefix}/{k}": float(v) for k, v in self.as_dict().items()}


def attention_flops_per_token(config: dict[str, Any], seq_len: int) -> int:
    """2 · n_layers · n_ctx · d_attn (the QKᵀ and AV products, averaged over the context)."""
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    return 2 * int(config["num_hidden_layers"]) * seq_len * heads * head_dim


def account(config: dict[str, Any], dense_parameters: int, moe_parameters: int,
            active_parameters: int, embedding_parameters: int, seq_len: int) -> Accounting:
    """Totals from the upcycler's per-tensor counts; ``config`` is the dense config.json."""
    lookup = 0 if config.get("tie_word_embeddings") else embedding_parameters
    attention = attention_flops_per_token(config, seq_len)
    return Accounting(
        dense_parameters=dense_parameters, moe_parameters=moe_parameters,
        active_parameters=active_parameters,
        dense_flops_per_token=2 * (dense_parameters - lookup) + attention,
        active_flops_per_token=2 * (active_parameters - lookup) + attention,
        seq_len=seq_len)
