"""Evaluate one model directory on the configured suites with lm-eval's Python API.

The model is loaded once (``AutoModelForCausalLM``, no remote code; importing
:mod:`components.moe.modeling` registers the package's own MoE class) and wrapped in lm-eval's
``HFLM``, so every suite runs on the same weights (bf16 on a GPU, fp32 on CPU). Tasks whose
answer is generated (instructions, MGSM, FLORES) get the tokenizer's chat template; scored tasks
(perplexity, multiple choice) see plain text. Each group is one ``simple_evaluate`` call over
config dicts, so tasks read local files only. lm-eval's own record of each call (task configs,
versions, n-shot, and the samples when asked) is kept by :func:`write_lmeval_outputs`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from components.evaluate.results import ResultRow, merge_rows, rows_from_lmeval
from components.evaluate.suites import build_suite_tasks

__all__ = ["EvalOptions", "evaluate_loaded", "evaluate_model", "load_for_eval",
           "write_lmeval_outputs"]

log = logging.getLogger(__name__)

_GENERATIVE = ("generate_until",)


@dataclass(frozen=True)
class EvalOptions:
    """How to run: sizes, few-shot, generation length, where data lives, the device."""

    suites: tuple[str, ...] = ("synthetic",)
    batch_size: int = 8
    limit: int | None = None
    num_fewshot: int = 0
    max_gen_tokens: int = 32
    world_eval_dir: str | None = None
    data_dir: str | None = None
    original: tuple[str, ...] = ()
    device: str | None = None
    chat_template: bool = True
    bootstrap_iters: int = 100
    seed: int = 0
    log_samples: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@cache
def _inline_tasks() -> Any:
    """A task manager that indexes nothing: every task arrives as a config dict (the default
    one scans lm-eval's ~10k YAML files on every call)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False)


def load_for_eval(model_dir: str | Path, device: str | None = None) -> tuple[Any, Any]:
    """(model in eval mode on ``device``, tokenizer) from a Hugging Face directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import components.moe.modeling  # noqa: F401  registers the package's MoE class

    path = Path(model_dir).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model directory (no config.json)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    # bf16 on a GPU (what the model will be served in, half the memory); fp32 on CPU, where
    # bf16 matmuls are slow and the scores must match the CPU tests'
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False, dtype=dtype)
    model.to(device).eval()
    if getattr(model, "generation_config", None) is not None:
        # a saved max_new_tokens would override lm-eval's per-task max_gen_toks
        model.generation_config.max_new_tokens = None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def evaluate_loaded(model: Any, tokenizer: Any, languages: Sequence[str],
                    options: EvalOptions, outputs: dict[str, Any] | None = None
                    ) -> list[ResultRow]:
    """Rows for every suite × language on an already loaded model; ``outputs`` (when given)
    receives lm-eval's own results dict of each call, keyed ``scored`` / ``generated``."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    has_template = bool(options.chat_template and getattr(tokenizer, "chat_template", None))
    tasks = build_suite_tasks(options.suites, list(languages),
                              world_eval_dir=options.world_eval_dir,
                              data_dir=options.data_dir, original=list(options.original),
                              max_gen_tokens=options.max_gen_tokens, chat_template=has_template)
    if not tasks:
        return []
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size,
              device=str(next(model.parameters()).device))
    groups: dict[bool, dict[str, tuple[dict[str, Any], str, str]]] = {False: {}, True: {}}
    for name, entry in tasks.items():
        chat = has_template and entry[0].get("output_type") in _GENERATIVE
        groups[chat][name] = entry
    rows: list[ResultRow] = []
    for chat, group in groups.items():
        if not group:
            continue
        log.info("lm-eval: %d tasks%s", len(group), " (chat template)" if chat else "")
        results = simple_evaluate(
            model=lm, tasks=[cfg for cfg, _, _ in group.values()],
            num_fewshot=options.num_fewshot or None, limit=options.limit,
            apply_chat_template=chat, fewshot_as_multiturn=chat and options.num_fewshot > 0,
            task_manager=_inline_tasks(), log_samples=options.log_samples,
            bootstrap_iters=options.bootstrap_iters,
            random_seed=options.seed, numpy_random_seed=options.seed,
            torch_random_seed=options.seed, fewshot_random_seed=options.seed)
        if results is None:
            raise RuntimeError("lm-eval returned no results (not rank 0?)")
        rows += rows_from_lmeval(results, {n: (t, lang) for n, (_, t, lang) in group.items()})
        if outputs is not None:
            outputs["generated" if chat else "scored"] = results
    return merge_rows(rows)


def write_lmeval_outputs(outputs: Mapping[str, Any], folder: Path) -> list[Path]:
    """lm-eval's results of each call as ``results_<call>.json`` (everything but the samples:
    task configs, versions, n-shot, n-samples, the environment) and, when they were logged,
    ``samples_<call>/<task>.jsonl``; the files written. What a reader needs to trust a number
    or re-run it with lm-eval itself."""
    from lm_eval.utils import handle_non_serializable

    def dump(data: Any) -> str:
        return json.dumps(data, indent=1, default=handle_non_serializable, ensure_ascii=False)

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for call, results in outputs.items():
        kept = {k: v for k, v in results.items() if k != "samples"}
        path = folder / f"results_{call}.json"
        path.write_text(dump(kept) + "\n", encoding="utf-8")
        written.append(path)
        for task, samples in (results.get("samples") or {}).items():
            path = folder / f"samples_{call}" / f"{task}.jsonl"
            path.parent.mkdir(exist_ok=True)
            path.write_text("".join(json.dumps(s, default=handle_non_serializable,
                                               ensure_ascii=False) + "\n" for s in samples),
                            encoding="utf-8")
            written.append(path)
    return written


def evaluate_model(model_dir: str | Path, *, suites: Sequence[str], languages: Sequence[str],
                   original: Sequence[str] = (), world_eval_dir: str | Path | None = None,
                   data_dir: str | Path | None = None, batch_size: int = 8,
                   limit: int | None = None, num_fewshot: int = 0, max_gen_tokens: int = 32,
                   device: str | None = None, chat_template: bool = True) -> list[ResultRow]:
    """Evaluate the model in ``model_dir`` on ``suites`` in ``languages``; one row per number."""
    options = EvalOptions(
        suites=tuple(suites), batch_size=batch_size, limit=limit, num_fewshot=num_fewshot,
        max_gen_tokens=max_gen_tokens,
        world_eval_dir=str(world_eval_dir) if world_eval_dir else None,
        data_dir=str(data_dir) if data_dir else None, original=tuple(original), device=device,
        chat_template=chat_template)
    model, tokenizer = load_for_eval(model_dir, device)
    return evaluate_loaded(model, tokenizer, languages, options)
