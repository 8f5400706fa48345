"""The per-worker training loop: the same function under Ray Train and inline.

Per optimizer step: ``grad_accum`` micro batches (gradient sync only on the last), loss = LM
cross-entropy (+ ``balance_coef`` × load balancing + ``lpr_coef`` × language-prior routing on
an MoE, + ``classifier_coef`` × LayerMoE's classifier loss on a model with classifier layers,
per sequence or per token as ``classifier_level`` says), anchor rows of fused experts zeroed,
gradients clipped, AdamW over the trainable parameters only (frozen ones get no gradient and no
optimizer state; the fused kernel on CUDA), fused anchors restored, cosine LR. Batches are read
ahead in a background thread (``train.prefetch``); each log step adds tokens/s, peak memory
and, where the device's peak is known, MFU on active parameters
(:mod:`components.train.throughput`). Every ``checkpoint_every`` steps (and at the end) a DCP
checkpoint is reported; a restarted worker, or a rerun of the same run name, resumes from the
newest one, its data stream included (the checkpoint counts the micro batches consumed). With
``train.review.enabled`` an MoE run ends with a router-only phase (MoE-LPR's review: only the
routers in the optimizer, LPR with ``review.lpr_coef`` towards ``review.prior``'s targets)
counted after the main steps; validation then runs at the end of the main phase too, its
figures logged at that step and reported with a ``/pre_review`` suffix. Validation on an MoE
with an allocation also measures the anchor share of original-language tokens per layer and
the classifiers' accuracy (:class:`~components.train.metrics.RoutingMeter`).
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from components.moe.allocation import RoutingPrior
from components.moe.freeze import parameter_counts, role
from components.moe.routing import (
    RouterCapture,
    classifier_loss,
    load_balancing_loss,
    lpr_loss,
)
from components.train import checkpoint as ckpt
from components.train.data import IGNORE, Batch, Prefetcher, prefetched, validation_batches
from components.train.fsdp import AnchorGuard, build_sharded, device_mesh, placement
from components.train.metrics import LossMeter, RouterMeter, RoutingMeter
from components.train.prometheus import TrainGauges
from components.train.schedule import lr_factor
from components.train.session import record_start
from components.train.spec import TrainError, TrainSpec
from components.train.speed import adamw_kernel
from components.train.throughput import (
    active_parameters,
    flops_per_token,
    mfu,
    peak_memory_gib,
    peak_tflops,
)

log = logging.getLogger(__name__)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy per position [B, L-1] and its 0/1 mask (labels -100 → 0)."""
    target = labels[:, 1:]
    mask = (target != IGNORE).float()
    losses = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                             target.clamp_min(0).reshape(-1), reduction="none")
    return losses.view_as(mask) * mask, mask


class Worker:
    """One rank's state: model shards, optimizer, schedule, meters."""

    def __init__(self, spec: TrainSpec, session: Any, languages: list[str], seq_len: int) -> None:
        self.spec, self.session, self.languages = spec, session, languages
        self.cfg = spec.train
        self.steps = spec.total_steps(seq_len)
        self.review = spec.review_steps()
        self.device = _device(spec)
        self.place = placement(self.device, self.cfg.precision)
        torch.manual_seed(spec.seed)
        mesh = device_mesh(self.device)
        self.model = build_sharded(
            spec.init_dir, mesh, self.place, mode=spec.mode, freeze_anchor=spec.freeze_anchor,
            freeze_shared=spec.freeze_shared, train_layers=spec.train_layers,
            activation_checkpointing=self.cfg.activation_checkpointing,
            experts_implementation=self.cfg.experts_implementation,
            compile_blocks=self.cfg.compile)
        self.model.train()
        self.experts = getattr(self.model.config, "_experts_implementation", None)
        self.active = active_parameters(self.model)
        self.flops_per_token = flops_per_token(self.model, seq_len, self.active)
        self.peak = peak_tflops(self.device, self.cfg.peak_tflops)
        self.is_moe = spec.mode == "cpt_moe"
        self.capture = RouterCapture(self.model) if self.is_moe else None
        self.prior = (RoutingPrior.from_model(spec.init_dir, languages)
                      if self.is_moe and (Path(spec.init_dir) / "allocation.json").exists()
                      else None)
        if self.capture is not None and self.capture.classifiers and (
                self.prior is None or not self.prior.original):
            raise TrainError(f"{spec.init_dir}: classifier layers "
                             f"{sorted(self.capture.classifiers)} need allocation.json's "
                             "original_languages (the classifier's targets)")
        self.routing = (RoutingMeter(self.prior, sorted(self.capture.routers),
                                     sorted(self.capture.classifiers))
                        if self.capture is not None and self.prior is not None else None)
        self.pre_review: dict[str, float] = {}
        self.guard = AnchorGuard(self.model, self.is_moe and spec.freeze_anchor)
        self.losses = LossMeter(languages)
        self.routers = RouterMeter(languages, self.prior)
        self.logger = None
        if spec.tracking_uri and spec.mlflow_run_id:
            # imported here: a run that logs nothing does not need MLflow installed
            from components.tracking import RankZeroLogger

            self.logger = RankZeroLogger(spec.tracking_uri, spec.mlflow_run_id,
                                         rank=session.rank)
        # live figures for Prometheus/Grafana under Ray; rank 0's cover every rank's tokens
        self.gauges = TrainGauges(spec.run_name, spec.mode) if session.rank == 0 else None
        self.phase = "main"
        self.optimizer = self._optimizer("main")

    # ---------------------------------------------------------------- setup

    def _optimizer(self, phase: str) -> torch.optim.Optimizer:
        if phase == "main":
            params = [p for p in self.model.parameters() if p.requires_grad]
        else:
            params = [p for n, p in self.model.named_parameters()
                      if p.requires_grad and role(n) == "router"]
        if not params:
            raise TrainError(f"{self.spec.init_dir}: nothing to train in the {phase} phase "
                             "(every parameter is frozen)")
        decay = [p for p in params if p.ndim >= 2]
        rest = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay},
                  {"params": rest, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr_at(0 if phase ==
                                 "main" else self.steps), betas=(0.9, 0.95), eps=1e-8,
                                 **adamw_kernel(self.device))

    def lr_at(self, step: int) -> float:
        """The LR of optimizer step ``step`` (0-based over both phases): stateless, so a resumed
        run needs no scheduler state."""
        if step < self.steps:
            return self.cfg.lr * lr_factor(step, self.steps, self.spec.warmup(self.steps),
                                           self.cfg.min_lr_ratio)
        return self.cfg.review.lr * lr_factor(step - self.steps, self.review, 0,
                                              self.cfg.min_lr_ratio)

    def counts(self) -> dict[str, int]:
        """Trainable and frozen parameter counts (a guarded fused anchor counts as frozen), and
        this rank's optimizer-state elements (frozen parameters have none)."""
        state = sum(t.numel() for s in self.optimizer.state.values() for t in s.values()
                    if torch.is_tensor(t) and t.ndim > 0)
        return {**parameter_counts(self.model, self.is_moe and self.spec.freeze_anchor),
                "active": self.active, "optimizer_state_local": state}

    # ---------------------------------------------------------------- one step

    def forward(self, batch: Batch, lpr_coef: float, balance_coef: float,
                classifier_coef: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.capture is not None:
            self.capture.clear()
        logits = self.model(input_ids=batch.input_ids, use_cache=False).logits
        per_token, mask = token_losses(logits, batch.labels)
        mask = mask * batch.weight[:, None]
        lm = (per_token * batch.weight[:, None]).sum() / mask.sum().clamp_min(1.0)
        loss = lm
        if self.capture is not None and self.capture.logits:
            layers = self.capture.layers()
            router_logits = [self.capture.logits[layer] for layer in layers]
            if balance_coef > 0:
                top_k = self.capture.top_k()
                loss = loss + balance_coef * load_balancing_loss(
                    router_logits, [top_k[layer] for layer in layers])
            if lpr_coef > 0 and self.prior is not None:
                token_lang = batch.lang_index[:, None].expand_as(batch.input_ids)
                allowed = self.prior.allowed(layers, token_lang, self.cfg.review.prior)
                loss = loss + lpr_coef * lpr_loss(router_logits, allowed)
            if classifier_coef > 0 and self.capture.classifier_logits:
                loss = loss + classifier_coef * self._classifier_loss(batch)
        return loss, per_token.detach(), mask

    def _classifier_loss(self, batch: Batch) -> torch.Tensor:
        assert self.capture is not None and self.prior is not None  # checked in __init__
        is_new = self.prior.is_new(batch.lang_index)  # per sequence: its language's group
        rows = (batch.weight > 0)[:, None].expand_as(batch.input_ids)
        level = self.cfg.classifier_level
        target = is_new[:, None].expand(batch.input_ids.shape) if level == "token" else is_new
        logits = [self.capture.classifier_logits[layer]
                  for layer in sorted(self.capture.classifier_logits)]
        return classifier_loss(logits, target, rows, level)

    def step(self, batches: Any, step: int) -> tuple[int, float]:
        review = step >= self.steps
        coef_lpr = self.cfg.review.lpr_coef if review else self.cfg.lpr_coef
        coef_bal = 0.0 if review else self.cfg.balance_coef
        coef_cls = 0.0 if review else self.cfg.classifier_coef
        tokens = 0
        for micro in range(self.cfg.grad_accum):
            batch = next(batches).to(self.device)
            self.model.set_requires_gradient_sync(micro == self.cfg.grad_accum - 1)
            with self.capture if self.capture is not None else nullcontext():
                loss, per_token, mask = self.forward(batch, coef_lpr, coef_bal, coef_cls)
                (loss / self.cfg.grad_accum).backward()
                self.losses.update(per_token, mask, batch.lang_index)
                if self.capture is not None and self.capture.logits:
                    self.routers.update(self.capture.logits, self.capture.top_k(),
                                        batch.lang_index[:, None].expand_as(batch.input_ids))
            tokens += batch.tokens
        self.guard.zero_grads()
        trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        if review:  # only routers step; the rest must not keep stale gradients
            for p in self.model.parameters():
                if p.requires_grad and not any(p is q for q in trainable):
                    p.grad = None
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        max_norm = self.cfg.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm, foreach=True)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.optimizer.step()
        self.guard.restore()
        self.optimizer.zero_grad(set_to_none=True)
        return tokens, float(norm)

    # ---------------------------------------------------------------- validation, checkpoints

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        batches = validation_batches(self.spec.validation_paths, self.cfg.micro_batch_size,
                                     self.languages, self.spec.max_validation_rows,
                                     self.session.rank, self.session.world_size)
        if not batches:
            return {}
        self.model.eval()
        meter = LossMeter(self.languages)
        capture = self.capture if self.routing is not None else None
        with capture if capture is not None else nullcontext():
            for batch in batches:
                batch = batch.to(self.device)
                if capture is not None:
                    capture.clear()
                logits = self.model(input_ids=batch.input_ids, use_cache=False).logits
                per_token, mask = token_losses(logits, batch.labels)
                meter.update(per_token, mask * batch.weight[:, None], batch.lang_index)
                if capture is not None and self.routing is not None:
                    self.routing.update(capture.logits, capture.classifier_logits,
                                        capture.top_k(), batch.lang_index, batch.weight)
        self.model.train()
        routing = self.routing.metrics(self.device) if self.routing is not None else {}
        return {**meter.metrics("val/loss", self.device), **routing}

    def save(self, step: int, tokens: int, extra: dict[str, Any]) -> Any:
        state = {"step": step, "tokens": tokens, "phase": self.phase, "languages": self.languages,
                 "spec": {"mode": self.spec.mode, "init_dir": self.spec.init_dir}, **extra}

        def write(path: Path) -> None:
            ckpt.save(path, self.model, self.optimizer, state)
        return write

    def restore(self) -> dict[str, Any] | None:
        with self.session.restore() as path:
            if path is None:
                return None
            state = ckpt.read_state(path)
            if state.get("phase") == "review":
                self.phase = "review"
                self.optimizer = self._optimizer("review")
            ckpt.load(path, self.model, self.optimizer)
        return state

    # ---------------------------------------------------------------- the run

    def run(self) -> None:
        spec, cfg, session = self.spec, self.cfg, self.session
        total = self.steps + self.review
        state = self.restore()
        start = int(state["step"]) if state else 0
        tokens = int(state["tokens"]) if state else 0
        step_seconds = float(state.get("step_seconds", 0.0)) if state else 0.0
        initial = dict(state.get("initial", {})) if state else {}
        self.pre_review = dict(state.get("pre_review", {})) if state else {}
        counts = self.counts()
        if session.rank == 0:
            record_start(session.run_dir, start if state else None, session.world_size)
        if self.logger is not None:
            self.logger.log_params({"train": {**cfg.model_dump(mode="json"), "mode": spec.mode,
                                              "steps_planned": total,
                                              "world_size": session.world_size}})
            self.logger.set_tags({"deltamoe.train.attempt": str(session.attempt),
                                  "deltamoe.train.experts_implementation": str(self.experts)})
            self.logger.log_metrics({f"params/{k}": v for k, v in counts.items()},
                                    step=start)
        if state is None:
            initial = {f"{k}/initial": v for k, v in self.validate().items()}
            if self.logger is not None:
                self.logger.log_metrics(initial, step=0)
        else:
            log.info("resuming at step %d of %d", start, total)
        # the stream resumes where the checkpoint left it: a restart does not re-read an epoch
        consumed = int(state.get("micro_batches", start * cfg.grad_accum)) if state else 0
        batches = prefetched(session.batches(cfg.micro_batch_size, self.languages,
                                             skip=consumed), cfg.prefetch, self.place.is_gpu)
        try:
            self._steps(start, total, tokens, step_seconds, initial, counts, batches)
        finally:
            if isinstance(batches, Prefetcher):
                batches.close()

    def _steps(self, start: int, total: int, tokens: int, step_seconds: float,
               initial: dict[str, Any], counts: dict[str, int], batches: Any) -> None:
        spec, cfg, session = self.spec, self.cfg, self.session
        if self.place.is_gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
        pending, window, window_start, norm = 0, 0.0, time.perf_counter(), 0.0
        loop_start = time.perf_counter()  # the loop's wall time, setup and first validation out
        for step in range(start, total):
            if step == self.steps and self.phase == "main":
                self.phase = "review"
                self.optimizer = self._optimizer("review")
            step_tokens, norm = self.step(batches, step)
            pending += step_tokens
            done = step + 1
            metrics: dict[str, float] = {}
            at_log = done % cfg.log_every == 0 or done == total
            if at_log or done % cfg.checkpoint_every == 0:
                counted = _all_sum(pending, self.device)  # every rank's tokens since last count
                tokens, window, pending = tokens + int(counted), window + counted, 0
            if at_log:
                elapsed = time.perf_counter() - window_start
                metrics = {**self.losses.metrics("train/loss", self.device),
                           **self.routers.metrics(self.device),
                           "train/lr": self.lr_at(step),
                           "train/grad_norm": norm, "train/tokens": float(tokens),
                           "train/tokens_per_s": window / elapsed,
                           "train/peak_memory_gib": peak_memory_gib(self.device)}
                used = mfu(window / elapsed, self.flops_per_token, self.peak, session.world_size)
                if used is not None:
                    metrics["train/mfu"] = used
                window, window_start = 0.0, time.perf_counter()
                if self.logger is not None:
                    self.logger.log_metrics(metrics, step=done)
                if self.gauges is not None:
                    self.gauges.update(done, total, metrics)
                session.progress({"step": done, "total": total,
                                  "loss": metrics.get("train/loss")})
            final = {}
            if done == self.steps and self.review > 0:  # the routing review is about to start
                measured = self.validate()
                if self.logger is not None:
                    self.logger.log_metrics(measured, step=done)
                self.pre_review = {f"{k}/pre_review": v for k, v in measured.items()}
            if done == total:
                final = self.validate()
                if self.logger is not None:
                    self.logger.log_metrics(final, step=done)
                final = {**self.pre_review, **final}
            if done % cfg.checkpoint_every == 0 or done == total:
                report = {"step": done, "tokens": tokens, **initial, **final,
                          **{k: v for k, v in metrics.items() if k.startswith("train/loss")}}
                session.report(done, report, self.save(done, tokens, {
                    "initial": initial, "final": final, "counts": counts,
                    "pre_review": self.pre_review,
                    "micro_batches": done * cfg.grad_accum,
                    "step_seconds": step_seconds + time.perf_counter() - loop_start}))
            if spec.fail_at_step == done and session.rank == session.world_size - 1:
                _inject_fault(spec, done)


def _inject_fault(spec: TrainSpec, step: int) -> None:
    marker = Path(spec.fail_marker) if spec.fail_marker else None
    if marker is None or marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(step))
    raise RuntimeError(f"injected fault at step {step} (fault-injection marker {marker})")


def _all_sum(value: float, device: torch.device) -> float:
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return float(tensor.item())


def _device(spec: TrainSpec) -> torch.device:
    if not spec.resources.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrainError("resources.use_gpu is set but this worker sees no CUDA device")
    if spec.resources.launcher == "ray":
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cuda", torch.cuda.current_device())


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point (``train_loop_config={"spec": ..., ...}``)."""
    from components.train.session import RaySession

    spec: TrainSpec = config["spec"]
    session = RaySession(config["run_dir"])
    if spec.resources.use_gpu:
        torch.cuda.set_device(_device(spec))
    Worker(spec, session, config["languages"], config["seq_len"]).run()


def spec_summary(spec: TrainSpec) -> dict[str, Any]:
    """The spec as plain JSON (for manifests)."""
    data = asdict(spec)
    data["train"] = spec.train.model_dump(mode="json")
    return data
