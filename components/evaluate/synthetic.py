"""The synthetic-world suite as lm-eval custom tasks over the world's local files.

Per language, tasks read ``eval/<tag>/`` of a world built by :mod:`components.synthetic`:

- ``synthetic_lm``: perplexity (bits per byte, word and byte perplexity) on held-out text that
  holds no facts, lm-eval's ``loglikelihood_rolling``;
- ``synthetic_openbook``: a biography of a person in no corpus, then a question; the answer is
  copied from the context (instruction following without knowledge);
- ``synthetic_closed_original``: a closed-book question about a person whose facts are only in
  the original languages' base text, asked in every language;
- ``synthetic_closed_new``: a closed-book question about a person whose facts are only in that
  new language's CPT corpus (an original language has no such file and is skipped);
- ``synthetic_mc``: four-way cloze multiple choice on facts that language's text holds (chance
  25%), independent of the answer format.

The three question tasks generate greedily in the chat template and score two metrics per item
with one ``process_results``: ``exact_match`` (the bare answer word, case, surrounding space and
punctuation ignored) and ``right_kind`` (the output is one of that attribute's answer words in
that language, any value: the format was followed, in the right language). lm-eval logs both
per sample beside the doc (person, attribute, lang, answer), so items can be paired.

Tasks are passed to lm-eval as config dicts with absolute ``data_files`` (lm-eval resolves a
relative path against the current directory, not the task's folder), so nothing is written and
nothing reaches a hub.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

__all__ = ["OPTIONAL_TASKS", "SYNTHETIC_TASKS", "lm_task", "score_answer", "synthetic_tasks"]

SYNTHETIC_TASKS = ("synthetic_lm", "synthetic_openbook", "synthetic_closed_original",
                   "synthetic_closed_new", "synthetic_mc")
OPTIONAL_TASKS = frozenset({"synthetic_closed_new"})  # only new languages have the file
_QUESTION_TASKS = ("synthetic_openbook", "synthetic_closed_original", "synthetic_closed_new")
_FILES = {"synthetic_lm": "lm.jsonl", "synthetic_openbook": "openbook.jsonl",
          "synthetic_closed_original": "closed_original.jsonl",
          "synthetic_closed_new": "closed_new.jsonl", "synthetic_mc": "mc.jsonl"}
_STOP = ["<|im_end|>", "<|endoftext|>", "\n"]
_STRIP = string.punctuation + string.whitespace + "«»—–…"


def _norm(text: str) -> str:
    return text.strip(_STRIP).casefold()


def score_answer(doc: dict[str, Any], results: list[str]) -> dict[str, int]:
    """``exact_match`` and ``right_kind`` of one generated answer (lm-eval's
    ``process_results``: ``results`` holds the filtered generation)."""
    output = _norm(results[0] if results else "")
    kinds = {_norm(w) for w in doc["answer_words"]}
    return {"exact_match": int(output == _norm(doc["answer"])),
            "right_kind": int(output in kinds)}


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


def _question(name: str, path: Path, max_gen_tokens: int, chat_template: bool
              ) -> dict[str, Any]:
    # With a chat template lm-eval renders the user turn itself (HFLM.apply_chat_template); a
    # tokenizer without one gets the world's own ChatML rendering, stored in ``text``.
    prompt = _user_turn if chat_template else "text"
    return {"task": name, **_data(path), "output_type": "generate_until",
            "doc_to_text": prompt, "doc_to_target": "answer", "target_delimiter": "",
            "generation_kwargs": {"until": list(_STOP), "do_sample": False,
                                  "max_gen_toks": max_gen_tokens},
            "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                          {"function": "take_first"}]}],
            "process_results": score_answer,
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                            for m in ("exact_match", "right_kind")],
            "metadata": {"version": 2}}


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
                if task in OPTIONAL_TASKS and (root / lang).is_dir():
                    continue  # e.g. closed_new in an original language: no such items
                have = sorted(p.name for p in root.iterdir() if p.is_dir()) \
                    if root.is_dir() else []
                raise FileNotFoundError(f"{path}: the synthetic world has no {task} data for "
                                        f"{lang} (languages there: {', '.join(have) or 'none'})")
            name = f"{task}_{lang}"
            if task == "synthetic_lm":
                config = lm_task(name, path)
            elif task in _QUESTION_TASKS:
                config = _question(name, path, max_gen_tokens, chat_template)
            else:
                config = _mc(name, path)
            out[name] = (config, task, lang)
    return out
