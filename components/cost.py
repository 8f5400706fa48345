"""What an expansion run will cost, from the models' ``config.json`` shapes alone.

Before a cluster run a platform team wants four numbers: how big the upcycled MoE is (total and
active per token), whether its continued pre-training fits a GPU under FSDP2, how many tokens
and FLOPs it is, and how many GPU-hours that buys at a stated model-FLOPs utilisation. This
module computes them without a download (the recipes ship their models' shapes) and says every
formula it uses, so a reader can check the arithmetic:

* **Parameters** of a Llama/Mistral/Qwen2/Qwen3 decoder: embedding V·H, per layer q/k/v/o
  (``H·(a+2k)·d + a·d·H``, plus q/k/v biases for Qwen2), two RMSNorms 2H and the SwiGLU FFN 3·H·I,
  a final norm H and an untied head V·H. The upcycled MoE replaces the FFN of each MoE layer by E
  copies plus a router E·H (Qwen2-MoE adds its shared expert 3·H·I and gate H); active per token
  counts top-k experts.
* **Memory per GPU** (FSDP2 fully sharded over N GPUs, as ``components.train.fsdp`` builds it):
  fp32 master parameters 4·P/N; fp32 gradients 4·T/N and AdamW's two fp32 moments 8·T/N of the
  trainable tensors T (frozen tensors have neither; fused expert tensors train whole — the anchor
  slice is kept by a guard, not by ``requires_grad``); the bf16 all-gather of one decoder layer
  and its prefetched neighbour 2·2·P_layer, plus the root unit (embeddings, head, final norm)
  that FSDP2 keeps gathered between forward and backward, 2·P_root; activations of one
  micro-batch of b·s tokens: with activation checkpointing each layer keeps its bf16 input
  (2·H bytes per token per layer) and one layer is live again during its backward, without it
  every layer keeps
  2·(6H + 2·k_v·d + k·(3I + 2H)) bytes per token (norm outputs, q/k/v, attention output with
  flash attention, the routed copies and SwiGLU intermediates of the k active experts); the
  logits and their gradient in fp32, 8·b·s·V bytes. A real run adds the CUDA context and
  allocator fragmentation (typically 2–5 GB).
* **FLOPs**: 6 · N_active · tokens for the matrix multiplies (forward 2, backward 4; N_active
  without the input embedding, a lookup), plus Kaplan et al.'s attention term 6 · L · s · a·d per
  token (QKᵀ and AV, forward and backward, not halved for the causal mask). Frozen weights skip
  their weight gradients in reality, so this is an upper bound of the work.
* **GPU-hours** = FLOPs ÷ (peak FLOP/s · MFU) ÷ 3600, at the stated peak and MFU.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from components.moe.accounting import attention_flops_per_token

__all__ = ["CostError", "Counts", "Memory", "Plan", "Shapes", "find_shapes", "format_plan",
           "memory_per_gpu", "parameter_counts", "plan_run", "shapes_file_name"]

GIB = 2**30
DEFAULT_PEAK_TFLOPS = 989.0  # H100 SXM, dense bf16
DEFAULT_MFU = 0.40
_BIAS_TYPES = ("qwen2",)


class CostError(ValueError):
    """No shapes for a model, or a config.json the cost model cannot read."""


@dataclass(frozen=True)
class Shapes:
    """The few ``config.json`` numbers the cost model needs."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str = "config.json") -> Shapes:
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            return cls(model_type=str(config.get("model_type", "llama")), hidden=hidden,
                       intermediate=int(config["intermediate_size"]),
                       layers=int(config["num_hidden_layers"]), heads=heads,
                       kv_heads=int(config.get("num_key_value_heads") or heads),
                       head_dim=int(config.get("head_dim") or hidden // heads),
                       vocab=int(config["vocab_size"]),
                       tied=bool(config.get("tie_word_embeddings", False)),
                       qkv_bias=bool(config.get("attention_bias", False))
                       or config.get("model_type") in _BIAS_TYPES)
        except (KeyError, TypeError, ValueError) as err:
            raise CostError(f"{where}: not a decoder config.json the cost model reads "
                            f"({err!r} missing or malformed)") from None

    @property
    def attention(self) -> int:
        """q, k, v, o weights (and q/k/v biases) of one layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.hidden * (q + 2 * kv) + q * self.hidden + \
            ((q + 2 * kv) if self.qkv_bias else 0)

    @property
    def ffn(self) -> int:
        return 3 * self.hidden * self.intermediate


@dataclass(frozen=True)
class Counts:
    """Parameter counts: the dense model, its upcycled MoE, and what training touches."""

    dense: int
    moe_total: int
    moe_active: int
    embedding: int  # the input embedding (a lookup: no FLOPs)
    trainable: int  # tensors with gradients and optimizer state
    learned: int  # of those, the elements that change (anchor slices excluded)
    largest_layer: int  # one decoder layer of the MoE: the FSDP2 all-gather unit

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def parameter_counts(shapes: Shapes, experts: int, top_k: int, moe_layers: Sequence[int],
                     *, freeze_shared: bool = True, freeze_anchor: bool = True) -> Counts:
    """Exact element counts of the dense model and the MoE upcycled from it."""
    h, v = shapes.hidden, shapes.vocab
    layer = shapes.attention + 2 * h + shapes.ffn
    embedding = v * h
    dense = embedding + shapes.layers * layer + h + (0 if shapes.tied else v * h)
    shared_expert = shapes.ffn + h if shapes.model_type == "qwen2" else 0
    router = experts * h
    n_moe = len(moe_layers)
    total = dense + n_moe * ((experts - 1) * shapes.ffn + router + shared_expert)
    active = dense + n_moe * ((top_k - 1) * shapes.ffn + router + shared_expert)
    moe_tensors = experts * shapes.ffn + router  # fused experts + router, per MoE layer
    trainable = n_moe * moe_tensors + (0 if freeze_shared else
                                       total - n_moe * moe_tensors)
    learned = trainable - (n_moe * shapes.ffn if freeze_anchor else 0)
    largest = layer - shapes.ffn + moe_tensors + shared_expert if n_moe else layer
    return Counts(dense=dense, moe_total=total, moe_active=active, embedding=embedding,
                  trainable=trainable, learned=learned, largest_layer=largest)


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU of one training run, by what holds them."""

    parameters: int
    gradients: int
    optimizer: int
    gathered: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return (self.parameters + self.gradients + self.optimizer + self.gathered
                + self.activations + self.logits)

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def memory_per_gpu(shapes: Shapes, counts: Counts, gpus: int, micro_batch: int, seq_len: int,
                   *, top_k: int, checkpointing: bool, moe: bool = True) -> Memory:
    """The FSDP2 estimate of the module docstring (``moe=False``: the dense model, all of it
    trained, top-1 'expert')."""
    params = counts.moe_total if moe else counts.dense
    trainable = counts.trainable if moe else counts.dense
    layer = counts.largest_layer if moe else shapes.attention + 2 * shapes.hidden + shapes.ffn
    root = counts.embedding * (1 if shapes.tied else 2) + shapes.hidden  # embeddings, head, norm
    k = top_k if moe else 1
    tokens = micro_batch * seq_len
    h, kv = shapes.hidden, shapes.kv_heads * shapes.head_dim
    per_layer_token = 2 * (6 * h + 2 * kv + k * (3 * shapes.intermediate + 2 * h))
    if checkpointing:
        acts = tokens * (shapes.layers * 2 * h + per_layer_token)
    else:
        acts = tokens * shapes.layers * per_layer_token
    return Memory(parameters=-(-4 * params // gpus), gradients=-(-4 * trainable // gpus),
                  optimizer=-(-8 * trainable // gpus), gathered=2 * root + 2 * 2 * layer,
                  activations=acts, logits=8 * tokens * shapes.vocab)


def shapes_file_name(model: str) -> str:
    """Where a recipe ships a hub model's shapes: ``meta-llama/Llama-3.1-8B`` →
    ``meta-llama--Llama-3.1-8B.json``."""
    return model.strip("/").replace("/", "--") + ".json"


def find_shapes(model: str, search: Sequence[Path] = ()) -> tuple[Shapes, str]:
    """The shapes of ``model``: a local model folder's (or file's) config.json, else a shipped
    ``<org>--<name>.json`` in one of ``search``; never the network."""
    candidates = [Path(model).expanduser() / "config.json", Path(model).expanduser()]
    candidates += [Path(folder) / shapes_file_name(model) for folder in search]
    for path in candidates:
        if path.is_file():
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise CostError(f"{path}: unreadable config.json ({err})") from None
            return Shapes.from_config(config, str(path)), str(path)
    where = ", ".join(str(p) for p in candidates)
    raise CostError(f"no config.json shapes for {model!r} (looked at {where}); pass --shapes "
                    "with the model's config.json, or download it once")


@dataclass(frozen=True)
class Plan:
    """Everything ``deltamoe plan`` prints."""

    model: str
    shapes_from: str
    shapes: Shapes
    experts: int
    top_k: int
    moe_layers: int
    counts: Counts
    gpus: int
    micro_batch: int
    seq_len: int
    checkpointing: bool
    memory: Memory
    dense_memory: Memory
    tokens: int
    steps: int
    review_tokens: int
    flops: float
    attention_flops: float
    peak_tflops: float
    mfu: float
    dense_flops: float = 0.0
    note: str = ""

    @property
    def gpu_hours(self) -> float:
        return self.flops / (self.peak_tflops * 1e12 * self.mfu) / 3600


def plan_run(cfg: Any, *, gpus: int | None = None, mfu: float = DEFAULT_MFU,
             peak_tflops: float = DEFAULT_PEAK_TFLOPS, shapes: str | None = None,
             search: Sequence[Path] = ()) -> Plan:
    """The cost of ``cfg``'s (a :class:`~components.config.RunConfig`) MoE continued
    pre-training. ``gpus`` (default: the config's Ray Train workers × GPUs per worker) shards the
    memory and divides the wall-clock; the tokens are the config's steps × global batch."""
    if cfg.models is None:
        raise CostError("the config has no `models` section (the synthetic world costs nothing "
                        "worth planning)")
    if not 0.0 < mfu <= 1.0:
        raise CostError(f"--mfu: expected 0 < MFU ≤ 1, got {mfu}")
    found, source = find_shapes(shapes or cfg.models.base, search)
    res, train, up = cfg.resources, cfg.train, cfg.upcycle
    n = gpus or max(1, round(res.num_workers * (res.gpus_per_worker if res.use_gpu else 1)))
    layers = list(range(found.layers)) if up.layers == "all" else list(up.layers)
    counts = parameter_counts(found, up.num_experts, up.top_k, layers,
                              freeze_shared=up.freeze.shared, freeze_anchor=up.freeze.anchor_expert)
    seq = cfg.data.seq_len
    ckpt = train.activation_checkpointing
    memory = memory_per_gpu(found, counts, n, train.micro_batch_size, seq, top_k=up.top_k,
                            checkpointing=ckpt)
    dense = memory_per_gpu(found, counts, n, train.micro_batch_size, seq, top_k=1,
                           checkpointing=ckpt, moe=False)
    # the config's world size sets the global batch (as TrainSpec.tokens_per_step does);
    # ``gpus`` only re-shards: a plan for more GPUs keeps the token budget
    per_step = train.micro_batch_size * train.grad_accum * res.num_workers * seq
    tokens = train.steps * per_step
    review = train.review.steps * per_step if train.review.enabled else 0
    attention = 3 * attention_flops_per_token(  # training = 3 × the forward pass
        {"num_hidden_layers": found.layers, "num_attention_heads": found.heads,
         "head_dim": found.head_dim}, seq)
    matmul = 6 * (counts.moe_active - (0 if found.tied else counts.embedding))
    return Plan(model=cfg.models.base, shapes_from=source, shapes=found,
                experts=up.num_experts, top_k=up.top_k, moe_layers=len(layers), counts=counts,
                gpus=n, micro_batch=train.micro_batch_size, seq_len=seq, checkpointing=ckpt,
                memory=memory, dense_memory=dense, tokens=tokens, steps=train.steps,
                review_tokens=review, flops=float((matmul + attention) * (tokens + review)),
                attention_flops=float(attention * (tokens + review)),
                dense_flops=float((6 * (counts.dense - (0 if found.tied else counts.embedding))
                                   + attention) * tokens),
                peak_tflops=peak_tflops, mfu=mfu,
                note="LayerMoE sets per-layer expert counts from the similarity analysis: this "
                     "plan assumes upcycle.num_experts in every layer, an upper bound"
                if up.allocation.method == "layermoe" else "")


def _gib(value: int) -> str:
    return f"{value / GIB:7.2f} GiB"


def format_plan(p: Plan) -> str:
    """The plan as the CLI prints it: numbers first, then the formulas behind them."""
    c, m, d, s = p.counts, p.memory, p.dense_memory, p.shapes
    lines = [
        f"model      {p.model}  ({s.model_type}: hidden {s.hidden}, intermediate "
        f"{s.intermediate}, {s.layers} layers, {s.heads} heads / {s.kv_heads} kv, vocab "
        f"{s.vocab}, {'tied' if s.tied else 'untied'}; shapes from {p.shapes_from})",
        f"MoE        {p.experts} experts, top-{p.top_k}, {p.moe_layers} MoE layers"
        + (f" ({p.note})" if p.note else ""),
        "parameters",
        f"  dense                {c.dense:>16,}",
        f"  MoE total            {c.moe_total:>16,}",
        f"  MoE active per token {c.moe_active:>16,}",
        f"  trainable tensors    {c.trainable:>16,}  (learned {c.learned:,}; the rest frozen)",
        f"memory per GPU, FSDP2 over {p.gpus} GPUs, micro-batch {p.micro_batch} × {p.seq_len}"
        f" tokens, activation checkpointing {'on' if p.checkpointing else 'off'}",
        "                       MoE CPT      dense CPT (baseline, all trained)",
    ]
    for key in ("parameters", "gradients", "optimizer", "gathered", "activations", "logits",
                "total"):
        lines.append(f"  {key:<12} {_gib(m.as_dict()[key])}  {_gib(d.as_dict()[key])}")
    lines += [
        f"tokens     {p.tokens:,} in {p.steps:,} steps ({p.tokens // max(p.steps, 1):,} per "
        f"step)" + (f" + review {p.review_tokens:,}" if p.review_tokens else ""),
        f"FLOPs      {p.flops:.3e}  (attention term {p.attention_flops:.3e})",
        f"GPU-hours  {p.gpu_hours:,.0f} at {p.mfu:.0%} MFU of {p.peak_tflops:g} TFLOP/s "
        f"(--mfu, --peak-tflops); {p.gpu_hours / p.gpus:,.1f} h wall-clock on {p.gpus} GPUs",
        f"baseline   a dense CPT on the same tokens (cpt_dense): {p.dense_flops:.3e} FLOPs, "
        f"{p.dense_flops / (p.peak_tflops * 1e12 * p.mfu) / 3600:,.0f} GPU-hours",
        "formulas   parameters 4·P/N (fp32 master), gradients 4·T/N, AdamW 8·T/N "
        "(T = trainable);",
        "           gathered 2·P_root + 2·2·P_layer (bf16); activations per token "
        + ("2·H per layer + one layer live" if p.checkpointing else
           "2·(6H + 2·kv + k·(3I + 2H)) per layer") + "; logits 8·V;",
        "           FLOPs = (6·N_active (input embedding excluded) + 6·L·s·a·d) · tokens;",
        "           add 2–5 GB per GPU for the CUDA context and allocator fragmentation",
    ]
    return "\n".join(lines) + "\n"
