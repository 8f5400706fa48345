"""What the training stage needs from an MoE's routers: their logits, two losses, and statistics.

Works the same on every MoE this package writes (Mixtral, Qwen2-MoE, Qwen3-MoE and the package's
own class): :class:`RouterCapture` hooks the router module of each MoE layer (the parameters
:func:`components.moe.families.tensor_role` calls routers), so nothing depends on a family's
``output_router_logits`` plumbing. Token order in a captured [tokens, E] tensor is
the flattened [batch, seq] order of the input, which is how masks and language ids line up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from components.moe.families import tensor_role


def _first(output: Any) -> torch.Tensor:
    # transformers 5 routers return (logits, top-k weights, top-k indices); ours is a Linear
    return output[0] if isinstance(output, tuple) else output


class RouterCapture:
    """Context manager recording router (and classifier) logits of every MoE layer per forward.

    ``logits[layer]`` is a [tokens, experts] tensor that keeps its autograd graph, so a loss built
    from it trains the routers. Call :meth:`clear` between steps (entering does it too).
    """

    def __init__(self, model: nn.Module) -> None:
        self.routers: dict[int, nn.Module] = {}
        self.classifiers: dict[int, nn.Module] = {}
        self._top_k: dict[int, int] = {}
        for name, _ in model.named_parameters():
            role = tensor_role(name)
            if role.kind not in ("router", "classifier"):
                continue
            assert role.layer is not None and role.block is not None
            module = model.get_submodule(name.rsplit(".", 1)[0])  # the Linear holding it
            if role.kind == "classifier":
                self.classifiers[role.layer] = module
                continue
            self.routers[role.layer] = module
            block = model.get_submodule(role.block)
            self._top_k[role.layer] = int(getattr(module, "top_k", None) or block.top_k)
        if not self.routers:
            raise ValueError(f"{type(model).__name__} has no MoE router to capture")
        self.logits: dict[int, torch.Tensor] = {}
        self.classifier_logits: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> RouterCapture:
        self.clear()
        for layer, module in self.routers.items():
            self._handles.append(module.register_forward_hook(self._keep(self.logits, layer)))
        for layer, module in self.classifiers.items():
            self._handles.append(
                module.register_forward_hook(self._keep(self.classifier_logits, layer)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.logits.clear()
        self.classifier_logits.clear()

    @staticmethod
    def _keep(store: dict[int, torch.Tensor], layer: int) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            store[layer] = _first(output)
        return hook

    def layers(self) -> list[int]:
        return sorted(self.logits)

    def top_k(self) -> dict[int, int]:
        """Experts per token of each MoE layer."""
        return dict(self._top_k)


def _token_mask(mask: torch.Tensor | None, tokens: int, device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones(tokens, dtype=torch.bool, device=device)
    flat = mask.reshape(-1).to(device=device, dtype=torch.bool)
    if flat.numel() != tokens:
        raise ValueError(f"mask has {flat.numel()} tokens, router logits have {tokens}")
    return flat


def load_balancing_loss(logits: Sequence[torch.Tensor], top_k: int | Sequence[int],
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss, computed per layer and averaged over layers.

    Per layer, over the unmasked tokens: ``E · Σ_e f_e · P_e`` with ``f_e`` the share of top-k
    assignments that go to expert e and ``P_e`` the mean router probability of e. Both sum to 1,
    so a perfectly even router scores 1 and a collapsed one scores E. (Mixtral's reference sums
    over the k slots instead of averaging and pools the layers: its value is k times this one
    for a single layer.) Padding (``mask`` 0) takes no part.
    """
    if not logits:
        raise ValueError("no router logits: did the forward pass run inside RouterCapture?")
    ks = [top_k] * len(logits) if isinstance(top_k, int) else list(top_k)
    losses = []
    for layer_logits, k in zip(logits, ks, strict=True):
        keep = _token_mask(mask, layer_logits.shape[0], layer_logits.device)
        probs = torch.softmax(layer_logits[keep].float(), dim=-1)
        experts = probs.shape[-1]
        chosen = torch.topk(probs, min(k, experts), dim=-1).indices
        share = F.one_hot(chosen, experts).float().sum(dim=1).mean(dim=0) / chosen.shape[-1]
        losses.append(experts * torch.sum(share * probs.mean(dim=0)))
    return torch.stack(losses).mean()


def lpr_loss(logits: Sequence[torch.Tensor], allowed: Sequence[torch.Tensor],
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """Language-prior routing loss: −log of the router probability mass on the allowed experts.

    For a token whose language may use the experts in A: ``−log Σ_{e∈A} softmax(z)_e
    = logsumexp(z) − logsumexp(z_A)``, computed in that log-space form (stable, and exactly the
    cross-entropy against the set A). MoE-LPR's "original-language tokens → expert 0" is the
    case A = {0}. Tokens whose row in ``allowed`` is all False, or masked out, are ignored;
    the loss is the mean over the remaining tokens of every layer.
    """
    total, count = None, 0
    for layer_logits, layer_allowed in zip(logits, allowed, strict=True):
        z = layer_logits.float()
        keep = _token_mask(mask, z.shape[0], z.device) & layer_allowed.any(dim=-1)
        if not keep.any():
            continue
        z, permitted = z[keep], layer_allowed[keep].to(z.device)
        nll = torch.logsumexp(z, dim=-1) - torch.logsumexp(z.masked_fill(~permitted, -torch.inf),
                                                           dim=-1)
        total = nll.sum() if total is None else total + nll.sum()
        count += nll.numel()
    if total is None:
        reference = logits[0] if logits else torch.zeros(())
        return reference.sum() * 0.0
    return total / count


ClassifierLevel = Literal["sequence", "token"]


def _classifier_rows(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
                     level: ClassifierLevel) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's classifier logits and targets at ``level``, padding left out.

    ``token``: every unmasked token is a row, ``target`` per token ([B, L] or flat).
    ``sequence``: ``target`` holds one group per sequence ([B]); a row is the mean of the
    sequence's unmasked token logits, which (the classifier being linear) is the classifier
    applied to the sequence's summed FFN inputs divided by its length — LayerMoE's
    sequence-level training, averaged rather than summed so that the bias stays at the scale of
    the per-token decision the classifier makes when routing.
    """
    z = logits.float()
    if level == "token":
        keep = _token_mask(mask, z.shape[0], z.device)
        return z[keep], target.reshape(-1).to(z.device).long()[keep]
    sequences = target.reshape(-1).shape[0]
    if z.shape[0] % sequences:
        raise ValueError(f"{z.shape[0]} token logits do not split into {sequences} sequences")
    keep = _token_mask(mask, z.shape[0], z.device).view(sequences, -1, 1).float()
    counts = keep.sum(dim=1)
    pooled = (z.view(sequences, -1, z.shape[-1]) * keep).sum(dim=1) / counts.clamp_min(1.0)
    present = counts[:, 0] > 0
    return pooled[present], target.reshape(-1).to(z.device).long()[present]


def classifier_loss(logits: Sequence[torch.Tensor], is_new: torch.Tensor,
                    mask: torch.Tensor | None = None,
                    level: ClassifierLevel = "token") -> torch.Tensor:
    """Cross-entropy of the LayerMoE classifiers against the group (0 original, 1 new), mean
    over classifier layers; ``is_new`` per token (``token``) or per sequence (``sequence``)."""
    losses = []
    for layer_logits in logits:
        rows, target = _classifier_rows(layer_logits, is_new, mask, level)
        losses.append(F.cross_entropy(rows, target))
    return torch.stack(losses).mean()


@torch.no_grad()
def classifier_correct(logits: torch.Tensor, is_new: torch.Tensor,
                       mask: torch.Tensor | None = None,
                       level: ClassifierLevel = "token") -> tuple[int, int]:
    """(correct, rows) of one classifier layer's decision (argmax, ties to class 0 as routing
    does) at ``level``: the figures behind the logged classifier accuracy."""
    rows, target = _classifier_rows(logits, is_new, mask, level)
    return int((rows.argmax(dim=-1) == target).sum()), int(target.numel())


@torch.no_grad()
def anchor_hits(router_logits: torch.Tensor, top_k: int,
                classifier_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Per token (bool [tokens]): does its routing use the anchor expert 0?

    True when the router's top-k includes expert 0, or when the layer's classifier judges the
    token original-language (it then goes to the anchor alone, whatever the router says).
    """
    experts = router_logits.shape[-1]
    hits = (torch.topk(router_logits.float(), min(top_k, experts), dim=-1).indices == 0).any(-1)
    if classifier_logits is not None:
        hits = hits | (classifier_logits.argmax(dim=-1) == 0)
    return hits


@dataclass
class RouterStats:
    """Expert load per layer per language, accumulated over batches.

    Load is the share of a language's top-k assignments in a layer that went to each expert
    (each row sums to 1), the figure MLflow shows as ``router/load/<layer>/<expert>/<lang>``.
    """

    languages: list[str]

    def __post_init__(self) -> None:
        self.counts: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, logits: dict[int, torch.Tensor], top_k: dict[int, int] | int,
               lang_index: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """``lang_index`` is each token's index into ``languages`` ([batch, seq] or flat)."""
        langs = lang_index.reshape(-1)
        for layer, layer_logits in logits.items():
            k = top_k if isinstance(top_k, int) else top_k[layer]
            keep = _token_mask(mask, layer_logits.shape[0], layer_logits.device)
            experts = layer_logits.shape[-1]
            chosen = torch.topk(layer_logits[keep].float(), min(k, experts), dim=-1).indices
            hits = F.one_hot(chosen, experts).sum(dim=1).float().cpu()  # [tokens, E]
            table = self.counts.setdefault(layer, torch.zeros(len(self.languages), experts))
            table.index_add_(0, langs[keep.cpu()].cpu().long(), hits)

    def load(self) -> dict[int, dict[str, list[float]]]:
        out: dict[int, dict[str, list[float]]] = {}
        for layer, table in sorted(self.counts.items()):
            totals = table.sum(dim=1, keepdim=True).clamp_min(1)
            shares = table / totals
            out[layer] = {lang: shares[i].tolist() for i, lang in enumerate(self.languages)
                          if table[i].sum() > 0}
        return out

    def metrics(self) -> dict[str, float]:
        return {f"router/load/{layer}/{expert}/{lang}": value
                for layer, by_lang in self.load().items()
                for lang, row in by_lang.items() for expert, value in enumerate(row)}
