"""Routing losses, freezing (what the training loop uses: set_requires_grad, AnchorGuard,
parameter_counts) and router statistics on tiny upcycled models."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from common import tiny_dims
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from components.moe.allocation import RoutingPrior
from components.moe.freeze import parameter_counts, role, set_requires_grad
from components.moe.routing import (
    RouterCapture,
    RouterStats,
    anchor_hits,
    classifier_loss,
    load_balancing_loss,
    lpr_loss,
)
from components.moe.upcycle import UpcycleOptions, upcycle
from components.train.fsdp import AnchorGuard

TINY = tiny_dims(64)


def _moe(tmp_path: Path, **options: object) -> Path:
    torch.manual_seed(0)
    dense = tmp_path / "dense"
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(dense)
    out = tmp_path / "moe"
    out.mkdir()
    upcycle(dense, out, UpcycleOptions(**{"num_experts": 4, "top_k": 2, "seed": 0,
                                          "expert_noise_std": 0.02, **options}))
    return out


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 'languages' with disjoint token ranges; language index per token."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randint(0, 32, (4, 12), generator=g)
    high = torch.randint(32, 64, (4, 12), generator=g)
    lang = torch.cat([torch.zeros(4, 12), torch.ones(4, 12)]).long()
    return torch.cat([low, high]), lang


def test_load_balancing_loss_values_and_padding_mask() -> None:
    tokens, experts = 8, 4
    collapsed = torch.zeros(tokens, experts)
    collapsed[:, 0] = 20.0
    assert load_balancing_loss([collapsed], top_k=1).item() == pytest.approx(experts, rel=1e-3)
    even = torch.eye(experts).repeat(2, 1) * 20.0
    assert load_balancing_loss([even], top_k=1).item() == pytest.approx(1.0, rel=1e-3)
    # padding rows that are all collapsed onto expert 0 must not count
    mixed = torch.cat([even, collapsed])
    mask = torch.cat([torch.ones(8), torch.zeros(8)])
    assert load_balancing_loss([mixed], 1, mask).item() == pytest.approx(1.0, rel=1e-3)
    assert load_balancing_loss([mixed], 1).item() > 1.5
    # per layer, then the mean over layers
    both = load_balancing_loss([collapsed, even], top_k=1).item()
    assert both == pytest.approx((experts + 1.0) / 2, rel=1e-3)


def test_lpr_loss_is_the_log_softmax_mass_of_the_allowed_set() -> None:
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 3.0, 1.0], [2.0, 1.0, 0.0, 0.0]])
    allowed = torch.tensor([[True, False, False, False], [False, True, True, False],
                            [False, False, False, False]])  # last token: no prior, ignored
    probs = torch.softmax(logits, dim=-1)
    expected = -(math.log(probs[0, 0]) + math.log(probs[1, 1] + probs[1, 2])) / 2
    assert lpr_loss([logits], [allowed]).item() == pytest.approx(expected, rel=1e-6)
    # huge logits stay finite (log-space form)
    assert torch.isfinite(lpr_loss([logits * 1e4], [allowed]))
    masked = lpr_loss([logits], [allowed], mask=torch.tensor([1, 0, 1]))
    assert masked.item() == pytest.approx(-math.log(probs[0, 0]), rel=1e-6)


def test_lpr_steps_move_routing_to_the_allowed_experts(tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(_moe(tmp_path, router_init="normal"))
    prior = RoutingPrior(("eng_Latn", "swh_Latn"), frozenset({"eng_Latn"}), (4, 4),
                         {"swh_Latn": [1, 2]}, {})
    ids, lang = _batch()
    routers = [p for n, p in model.named_parameters() if role(n) == "router"]
    optimizer = torch.optim.Adam(routers, lr=0.05)

    def allowed_share(capture: RouterCapture) -> float:
        masks = prior.allowed(capture.layers(), lang)
        hits = [m.gather(1, capture.logits[layer].topk(1).indices).float().mean()
                for layer, m in zip(capture.layers(), masks, strict=True)]
        return float(torch.stack(hits).mean())

    with RouterCapture(model) as capture:
        with torch.no_grad():
            model(ids)
        before = allowed_share(capture)
        for _ in range(30):
            capture.clear()
            model(ids)
            layers = capture.layers()
            loss = lpr_loss([capture.logits[i] for i in layers], prior.allowed(layers, lang))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        capture.clear()
        with torch.no_grad():
            model(ids)
        after = allowed_share(capture)
    assert before < 0.75
    assert after > 0.95


def test_balancing_steps_even_out_expert_load(tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(_moe(tmp_path, router_init="normal"))
    ids, lang = _batch(1)
    inputs: dict[int, torch.Tensor] = {}
    capture = RouterCapture(model)
    hooks = [router.register_forward_pre_hook(
        lambda _m, args, layer=layer: inputs.__setitem__(layer, args[0].reshape(-1, 32)))
        for layer, router in capture.routers.items()]
    with torch.no_grad():  # start collapsed: every token's top 2 are experts 3 and 2
        model(ids)
        for layer, router in capture.routers.items():
            x = inputs[layer]
            for expert, logit in ((3, 4.0), (2, 3.0)):
                target = torch.full((x.shape[0], 1), logit)
                router.weight[expert] = torch.linalg.lstsq(x, target).solution[:, 0]
    for hook in hooks:
        hook.remove()
    routers = [p for n, p in model.named_parameters() if role(n) == "router"]
    optimizer = torch.optim.Adam(routers, lr=0.05)

    def load_spread(capture: RouterCapture) -> float:
        stats = RouterStats(["all"])
        stats.update(capture.logits, capture.top_k(), torch.zeros_like(lang))
        return max(max(row) - min(row) for by_lang in stats.load().values()
                   for row in by_lang.values())

    with RouterCapture(model) as capture:
        with torch.no_grad():
            model(ids)
        before = load_spread(capture)
        for _ in range(20):
            capture.clear()
            model(ids)
            loss = load_balancing_loss([capture.logits[i] for i in capture.layers()], 2)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        capture.clear()
        with torch.no_grad():
            model(ids)
        after = load_spread(capture)
        final = load_balancing_loss([capture.logits[i] for i in capture.layers()], 2).item()
    assert before > 0.4  # experts 3 and 2 take nearly every assignment
    assert after < before / 3
    assert final < 1.1


@pytest.mark.parametrize("layers", [None, (1,)])
def test_freezing_keeps_anchor_and_shared_weights_exact(tmp_path: Path, layers: object) -> None:
    """Fused (Mixtral) and per-expert (package class, via a dense layer) both stay bit-exact
    under AdamW with weight decay, while new experts and routers move."""
    model = AutoModelForCausalLM.from_pretrained(_moe(tmp_path, layers=layers))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    set_requires_grad(model, anchor_expert=True, shared=True)
    guard = AnchorGuard(model, enabled=True)
    ffn, moe_layers = 3 * 32 * 48, 2 if layers is None else 1
    counts = parameter_counts(model, fused_anchor_frozen=True)
    assert counts["trainable"] == moe_layers * (3 * ffn + 4 * 32)  # 3 new experts
    assert counts["trainable"] + counts["frozen"] == sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                                  weight_decay=0.1)
    ids, _ = _batch()
    for _ in range(3):  # the training loop's order: zero anchor grads, step, restore anchors
        with RouterCapture(model) as capture:
            out = model(ids, labels=ids)
            balance = load_balancing_loss([capture.logits[i] for i in capture.layers()], 2)
        optimizer.zero_grad()
        (out.loss + 0.1 * balance).backward()
        guard.zero_grads()
        optimizer.step()
        guard.restore()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    for name, param in model.named_parameters():
        kind = role(name)
        if kind in ("shared", "anchor"):
            assert name not in changed, name
        elif kind == "fused_experts":
            assert torch.equal(param[0], before[name][0]), name  # the anchor slice
            assert not torch.equal(param[1:], before[name][1:]), name
        else:
            assert name in changed, name
    assert any(role(n) == "router" for n in changed)


def test_router_stats_and_classifier_loss(tmp_path: Path) -> None:
    out = tmp_path / "cls"
    torch.manual_seed(0)
    dense = tmp_path / "dense"
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(dense)
    out.mkdir()
    upcycle(dense, out, UpcycleOptions(experts_per_layer=(3, 2), top_k=1, classifier_layers=(0,)))
    model = AutoModelForCausalLM.from_pretrained(out)
    ids, lang = _batch()
    mask = torch.ones_like(ids)
    mask[:, -2:] = 0
    with RouterCapture(model) as capture:
        model(ids, attention_mask=mask)
    assert capture.top_k() == {0: 1, 1: 1}
    assert sorted(capture.classifier_logits) == [0]
    stats = RouterStats(["eng_Latn", "swh_Latn"])
    stats.update(capture.logits, capture.top_k(), lang, mask)
    load = stats.load()
    assert sorted(load) == [0, 1] and len(load[0]["swh_Latn"]) == 3
    for by_lang in load.values():
        for row in by_lang.values():
            assert sum(row) == pytest.approx(1.0)
    total = stats.counts[0].sum().item()
    assert total == 8 * 10  # padding excluded, top-1
    metrics = stats.metrics()
    assert "router/load/1/1/swh_Latn" in metrics and len(metrics) == 2 * (3 + 2)
    prior = RoutingPrior(("eng_Latn", "swh_Latn"), frozenset({"eng_Latn"}), (3, 2), {}, {})
    target = prior.is_new(lang)
    logits = capture.classifier_logits[0]
    loss = classifier_loss([logits], target, mask)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-5)  # zero-initialised classifier
    loss.backward()
    assert model.model.layers[0].mlp.classifier.weight.grad.abs().sum() > 0


def test_routing_prior_resolution() -> None:
    prior = RoutingPrior(("eng_Latn", "deu_Latn", "swh_Latn", "rus_Cyrl", "tha_Thai"),
                         frozenset({"eng_Latn", "deu_Latn"}), (4, 2),
                         {"original": [0], "swh_Latn": [1, 2], "rus_Cyrl": [3]},
                         {"original": ["eng_Latn", "deu_Latn"]})
    assert prior.experts_for("deu_Latn", 0) == [0]  # through its group
    assert prior.experts_for("swh_Latn", 0) == [1, 2]
    assert prior.experts_for("swh_Latn", 1) == [1]  # ids the layer lacks are dropped
    assert prior.experts_for("rus_Cyrl", 1) == [0, 1]  # none left: every expert
    assert prior.experts_for("tha_Thai", 0) == [0, 1, 2, 3]  # no prior
    masks = prior.allowed([0], torch.tensor([[2, 0]]))
    assert masks[0].tolist() == [[False, True, True, False], [True, False, False, False]]


def test_unallocated_languages_are_free_in_the_lpr_mean() -> None:
    """eng (original) → anchor, swh → [1, 2], tha has no entry: its tokens leave the mean
    instead of counting as zero-loss rows; under the anchor prior swh is free too."""
    prior = RoutingPrior(("eng_Latn", "swh_Latn", "tha_Thai"), frozenset({"eng_Latn"}), (4,),
                         {"original": [0], "swh_Latn": [1, 2]}, {"original": ["eng_Latn"]})
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    lang = torch.tensor([0, 1, 2])
    p = torch.softmax(logits, dim=-1)
    eng, swh = -math.log(p[0, 0]), -math.log(p[1, 1] + p[1, 2])
    allocation = prior.allowed([0], lang)
    assert allocation[0][2].tolist() == [False] * 4  # tha: free
    assert lpr_loss([logits], allocation).item() == pytest.approx((eng + swh) / 2, rel=1e-6)
    # the old all-allowed row would have added a zero and divided by 3
    assert (eng + swh) / 3 < lpr_loss([logits], allocation).item()
    anchor = prior.allowed([0], lang, "anchor")
    assert [row.tolist() for row in anchor[0]] == [[True, False, False, False], [False] * 4,
                                                   [False] * 4]
    assert lpr_loss([logits], anchor).item() == pytest.approx(eng, rel=1e-6)
    assert prior.experts_for("tha_Thai", 0) == [0, 1, 2, 3]  # the allocated-share metric's view


def test_anchor_hits_count_top_k_and_classifier_decisions() -> None:
    router = torch.tensor([[3.0, 2.0, 0.0], [0.0, 2.0, 3.0], [0.0, 2.0, 3.0], [2.0, 3.0, 0.0]])
    assert anchor_hits(router, 2).tolist() == [True, False, False, True]
    assert anchor_hits(router, 1).tolist() == [True, False, False, False]
    # class 0 (original) sends a token to the anchor alone; a tie goes to class 0 too
    classifier = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    assert anchor_hits(router, 1, classifier).tolist() == [True, True, True, False]
