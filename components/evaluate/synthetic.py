"""The synthetic-world suite as lm-eval custom tasks over the world's local files.

Per language, three tasks read ``eval/<tag>/`` of a world built by :mod:`components.synthetic`:

- ``synthetic_lm``: perplexity (bits per byte, word and byte perplexity) on held-out text,
  lm-eval's ``loglikelihood_rolling``;
- ``synthetic_instruct``: the question in the chat template, greedy generation, exact match of
  the bare answer word (case and punctuation ignored) — instruction following in that language;
- ``synthetic_mc``: four-way cloze multiple choice on facts (chance is 25%) — knowledge in that
  language, independent of the answer format.

Tasks are passed to lm-eval as config dicts with absolute ``data_files`` (lm-eval resolves a
relative path against the current directory, not the task's folder), so nothing is written and
nothing reaches a hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["SYNTHETIC_TASKS", "lm_task", "synthetic_tasks"]

SYNTHETIC_TASKS = ("synthetic_lm", "synthetic_instruct", "synthetic_mc")
_FILES = {"synthetic_lm": "lm.jsonl", "synthetic_instruct": "instruct.jsonl",
          "synthetic_mc": "mc.jsonl"}
_STOP = ["<|im_end|>", "<|endoftext|>", "\n"]


def _data(path: Path) -> dict[str, Any]:
    return {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
            "test_split": "test"}


def _user_turn(doc: dict[str, Any]) -> str:
    return doc["messages"][0]["content"]


def lm_task(name: str, path: Path) -> dict[str, Any]:
    return {"task": name, **_data(path), "output_type": "loglikelihood_rolling",
            "doc_to_text": "", "doc_to_target": "text",
            "metric_list": [{"metric": m, "aggregation": agg, "higher_is_better": False}
                            for m, agg in (("bits_per_byte", "bits_per_byte"),
                                           ("word_perplexity", "weighted_perplexity"),
                                           ("byte_perplexity", "weighted_perplexity"))],
            "metadata": {"version": 1}}


def _instruct(name: str, path: Path, max_gen_tokens: int, chat_template: bool) -> dict[str, Any]:
    # With a chat template lm-eval renders the user turn itself (HFLM.apply_chat_template); a
    # tokenizer without one gets the world's own ChatML rendering, stored in ``text``.
    prompt = _user_turn if chat_template else "text"
    return {"task": name, **_data(path), "output_type": "generate_until",
            "doc_to_text": prompt, "doc_to_target": "answer", "target_delimiter": "",
            "generation_kwargs": {"until": list(_STOP), "do_sample": False,
                                  "max_gen_toks": max_gen_tokens},
            "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                          {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                             "higher_is_better": True, "ignore_case": True,
                             "ignore_punctuation": True}],
            "metadata": {"version": 1}}


def _mc(name: str, path: Path) -> dict[str, Any]:
    # choices carry their own leading space (" Doransi."), so no delimiter is added
    return {"task": name, **_data(path), "output_type": "multiple_choice",
            "doc_to_text": "query", "doc_to_choice": "choices",
            "doc_to_target": "gold", "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean",
                             "higher_is_better": True}],
            "metadata": {"version": 1}}


def synthetic_tasks(world_eval_dir: str | Path, languages: list[str], *,
                    tasks: tuple[str, ...] = SYNTHETIC_TASKS, max_gen_tokens: int = 16,
                    chat_template: bool = True) -> dict[str, tuple[dict[str, Any], str, str]]:
    """lm-eval task name → (config dict, task, lang) for every task and language.

    Raises FileNotFoundError naming the missing file when the world lacks a language.
    """
    root = Path(world_eval_dir).expanduser().resolve()
    unknown = [t for t in tasks if t not in SYNTHETIC_TASKS]
    if unknown:
        raise ValueError(f"unknown synthetic tasks {unknown}; known: {list(SYNTHETIC_TASKS)}")
    out: dict[str, tuple[dict[str, Any], str, str]] = {}
    for lang in languages:
        for task in tasks:
            path = root / lang / _FILES[task]
            if not path.is_file():
                have = sorted(p.name for p in root.iterdir() if p.is_dir()) \
                    if root.is_dir() else []
                raise FileNotFoundError(f"{path}: the synthetic world has no {task} data for "
                                        f"{lang} (languages there: {', '.join(have) or 'none'})")
            name = f"{task}_{lang}"
            if task == "synthetic_lm":
                config = lm_task(name, path)
            elif task == "synthetic_instruct":
                config = _instruct(name, path, max_gen_tokens, chat_template)
            else:
                config = _mc(name, path)
            out[name] = (config, task, lang)
    return out
