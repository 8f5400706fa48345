"""What the loop logs: loss per language, throughput, router load and allocated-expert share.

Sums are accumulated per rank between log steps and all-reduced at the log step, so rank 0's
figures (the only ones written to MLflow) cover every rank's tokens. Names follow the design:
``train/loss``, ``train/loss/<lang>``, ``train/lr``, ``train/tokens_per_s``,
``train/grad_norm``, ``router/load/<layer>/<expert>/<lang>`` and
``router/allocated_share/<lang>`` (the share of a language's top-k assignments that reach the
experts its allocation gives it, averaged over MoE layers). Validation adds
``router/anchor_share/<layer>`` and their mean ``router/anchor_share`` (the share of
original-language tokens whose experts include the anchor, classifier decisions counted) and,
on a model with LayerMoE classifiers, ``val/classifier_acc`` (per token, the routing decision)
and ``val/classifier_acc/sequence``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from components.moe.allocation import RoutingPrior
from components.moe.routing import RouterStats, anchor_hits, classifier_correct


class LossMeter:
    """Token-weighted loss sums per language."""

    def __init__(self, languages: Sequence[str]) -> None:
        self.languages = list(languages)
        self.sums = torch.zeros(len(self.languages), 2, dtype=torch.float64)  # loss·tokens, tokens

    @torch.no_grad()
    def update(self, token_loss: torch.Tensor, mask: torch.Tensor,
               lang_index: torch.Tensor) -> None:
        """``token_loss``/``mask`` [B, L-1]; ``mask`` holds the token weights (0 = no loss)."""
        per_row = (token_loss.double() * mask).sum(dim=1).cpu()
        count = mask.double().sum(dim=1).cpu()
        self.sums[:, 0].index_add_(0, lang_index.cpu(), per_row)
        self.sums[:, 1].index_add_(0, lang_index.cpu(), count)

    def reduce(self, device: torch.device) -> torch.Tensor:
        sums = self.sums.to(device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        return sums.cpu()

    def metrics(self, prefix: str, device: torch.device) -> dict[str, float]:
        sums = self.reduce(device)
        out = {}
        total = sums.sum(dim=0)
        if total[1] > 0:
            out[prefix] = float(total[0] / total[1])
        for i, lang in enumerate(self.languages):
            if sums[i, 1] > 0:
                out[f"{prefix}/{lang}"] = float(sums[i, 0] / sums[i, 1])
        self.sums.zero_()
        return out


class RouterMeter:
    """Router load per layer, expert and language, reduced over ranks at each log step."""

    def __init__(self, languages: Sequence[str], prior: RoutingPrior | None) -> None:
        self.languages = list(languages)
        self.prior = prior
        self.stats = RouterStats(self.languages)

    def update(self, logits: dict[int, torch.Tensor], top_k: dict[int, int],
               lang_index: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        self.stats.update({k: v.detach() for k, v in logits.items()}, top_k, lang_index, mask)

    def metrics(self, device: torch.device) -> dict[str, float]:
        counts = self.stats.counts
        if dist.is_initialized() and dist.get_world_size() > 1:
            for layer in sorted(counts):
                table = counts[layer].to(device)
                dist.all_reduce(table)
                counts[layer] = table.cpu()
        out = self.stats.metrics()
        if self.prior is not None:
            out.update(allocated_share(self.stats, self.prior))
        self.stats.counts = {}
        return out


def allocated_share(stats: RouterStats, prior: RoutingPrior) -> dict[str, float]:
    """Per language: share of its top-k assignments on its allocated experts, mean over layers."""
    shares: dict[str, list[float]] = {}
    for layer, by_lang in stats.load().items():
        for lang, row in by_lang.items():
            if lang not in prior.languages and lang not in prior.original:
                continue
            allowed = prior.experts_for(lang, layer)
            shares.setdefault(lang, []).append(sum(row[e] for e in allowed))
    return {f"router/allocated_share/{lang}": sum(v) / len(v) for lang, v in shares.items()}


class RoutingMeter:
    """Anchor share of original-language tokens per MoE layer and the classifiers' accuracy,
    summed over batches and reduced over ranks (what validation reports)."""

    def __init__(self, prior: RoutingPrior, layers: Sequence[int],
                 classifier_layers: Sequence[int]) -> None:
        self.prior = prior
        self.layers = list(layers)
        self.original = ~prior.is_new(torch.arange(len(prior.languages)))
        self.anchor = torch.zeros(len(self.layers), 2, dtype=torch.float64)  # hits, tokens
        self.classifier = torch.zeros(2, 2, dtype=torch.float64)  # token, sequence × right, all
        self.has_classifier = bool(classifier_layers)

    @torch.no_grad()
    def update(self, logits: dict[int, torch.Tensor], classifier_logits: dict[int, torch.Tensor],
               top_k: dict[int, int], lang_index: torch.Tensor, weight: torch.Tensor) -> None:
        """``lang_index``/``weight`` per sequence [B] (weight 0: a padding row)."""
        rows = weight.cpu() > 0
        tokens = next(iter(logits.values())).shape[0] // lang_index.shape[0]
        token_mask = rows[:, None].expand(-1, tokens).reshape(-1)
        original = (self.original[lang_index.cpu()][:, None].expand(-1, tokens).reshape(-1)
                    & token_mask)
        for i, layer in enumerate(self.layers):
            hits = anchor_hits(logits[layer], top_k[layer], classifier_logits.get(layer)).cpu()
            self.anchor[i, 0] += float((hits & original).sum())
            self.anchor[i, 1] += float(original.sum())
        is_new = self.prior.is_new(lang_index)
        for layer_logits in classifier_logits.values():
            for level, row in (("token", 0), ("sequence", 1)):
                target = is_new[:, None].expand(-1, tokens) if level == "token" else is_new
                right, count = classifier_correct(layer_logits.cpu(), target,
                                                  token_mask, level)
                self.classifier[row] += torch.tensor([right, count], dtype=torch.float64)

    def metrics(self, device: torch.device) -> dict[str, float]:
        sums = torch.cat([self.anchor, self.classifier]).to(device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        anchor, classifier = sums[:len(self.layers)].cpu(), sums[len(self.layers):].cpu()
        out: dict[str, float] = {}
        shares = [float(a / n) for a, n in anchor.tolist() if n > 0]
        for layer, (hits, count) in zip(self.layers, anchor.tolist(), strict=True):
            if count > 0:
                out[f"router/anchor_share/{layer}"] = hits / count
        if shares:
            out["router/anchor_share"] = sum(shares) / len(shares)
        if self.has_classifier:
            for key, (right, count) in zip(("val/classifier_acc", "val/classifier_acc/sequence"),
                                           classifier.tolist(), strict=True):
                if count > 0:
                    out[key] = right / count
        self.anchor.zero_()
        self.classifier.zero_()
        return out
