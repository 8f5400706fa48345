"""Task configs for every evaluation suite, keyed by canonical language tags.

- ``synthetic``: the world's offline suite (:mod:`components.evaluate.synthetic`).
- lm-eval benchmarks (every one :mod:`components.evaluate.catalog` lists: ``belebele``,
  ``xcopa``, ``xnli``, ``mgsm``, ``global_mmlu``, ...): the task name per language comes from
  :func:`components.languages.tasks_for`; a language a benchmark does not cover is skipped. The
  registered YAML is loaded and, with a data directory, its dataset is replaced by local files:
  ``<data_dir>/<task name>/<split>.{jsonl,json,parquet}`` for every split the task reads, in the
  hub dataset's own columns. Groups (Global-MMLU) are expanded to their leaf tasks, all reading
  the group's folder, and averaged back by size. A column that is null in every row of a split
  (MGSM's test answers) needs parquet, which keeps its type: from JSON the ``datasets`` loader
  infers a null column and refuses the other splits' values.
- ``flores``: the project's FLORES-200 translation task (``tasks/flores200.yaml``), into and out
  of each language from a pivot (the first original language), chrF and BLEU through sacrebleu.
- ``perplexity``: held-out text per language, ``<data_dir>/perplexity/<tag>.{jsonl,parquet}``
  with a ``text`` column.

Nothing here reaches a hub when a data directory is given: with ``HF_HUB_OFFLINE=1
HF_DATASETS_OFFLINE=1`` a task without local data fails with the path it expected.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from components.evaluate.catalog import benchmarks, suites
from components.evaluate.synthetic import SYNTHETIC_TASKS, synthetic_tasks
from components.languages import get_language, tasks_for

__all__ = [
    "BENCHMARKS",
    "LOCAL_ONLY",
    "SUITES",
    "SuiteError",
    "benchmark_tasks",
    "build_suite_tasks",
    "flores_tasks",
    "perplexity_tasks",
    "require_data_dir",
    "task_manager",
]

log = logging.getLogger(__name__)

BENCHMARKS = benchmarks()
SUITES = tuple(suites())
FLORES_YAML = Path(__file__).parent / "tasks" / "flores200.yaml"
_DATA_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_SPLIT_KEYS = ("test_split", "validation_split", "training_split", "fewshot_split")

TaskEntry = tuple[dict[str, Any], str, str]  # (lm-eval config dict, task, lang)


class SuiteError(ValueError):
    """A suite that cannot be built: unknown name, missing local data, a bad data layout."""


#: suites that read only local files (no hub fallback), and what each reads under data_dir
LOCAL_ONLY = {"flores": "flores200/devtest/<tag>.parquet", "perplexity": "perplexity/<tag>.jsonl"}


def require_data_dir(suite_names: Sequence[str], data_dir: str | Path | None) -> None:
    """Refuse local-only suites without a data directory: one error naming them all and the
    files each needs (the workflow asks before any stage runs, the task builders again)."""
    local = [s for s in suite_names if s in LOCAL_ONLY]
    if local and data_dir is None:
        raise SuiteError(f"suites {', '.join(local)} read local files: set evaluation.data_dir "
                         f"(--data-dir) to a folder holding "
                         f"{', '.join(LOCAL_ONLY[s] for s in local)}")


@cache
def task_manager() -> Any:
    """lm-eval's index of its registered tasks (built once: it scans ~10k YAML files)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _local_file(folder: Path, stem: str) -> Path | None:
    for ext in _DATA_EXTENSIONS:
        path = folder / f"{stem}{ext}"
        if path.is_file():
            return path
    return None


def _local_dataset(config: dict[str, Any], folder: Path, task: str) -> dict[str, Any]:
    """``config`` reading its splits from ``folder`` instead of the hub."""
    splits = sorted({config[k] for k in _SPLIT_KEYS if config.get(k)})
    files: dict[str, str] = {}
    kinds = set()
    for split in splits:
        path = _local_file(folder, split)
        if path is None:
            raise SuiteError(f"{folder}: no local data for split {split!r} of {task} (expected "
                             f"{split}.jsonl, {split}.json or {split}.parquet)")
        files[split] = str(path.resolve())
        kinds.add(_DATA_EXTENSIONS[path.suffix])
    if len(kinds) > 1:
        raise SuiteError(f"{folder}: mixes json and parquet files; use one format per task")
    out = dict(config)
    out.update(dataset_path=kinds.pop(), dataset_name=None,
               dataset_kwargs={"data_files": files})
    return out


def _leaves(name: str) -> list[str]:
    """The leaf tasks under a registered group or tag, in order."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = task_manager().task_index[name]
    if entry.kind == Kind.TAG:
        return sorted(entry.tags)
    if entry.kind != Kind.GROUP:
        return [name]
    raw = load_yaml(entry.yaml_path, resolve_func=False)
    children = raw.get("task", [])
    out: list[str] = []
    for child in children if isinstance(children, list) else [children]:
        out += _leaves(child if isinstance(child, str) else child["task"])
    return out


def _registered_config(name: str) -> dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = task_manager().task_index.get(name)
    if entry is None or entry.yaml_path is None:
        raise SuiteError(f"lm-eval has no task {name!r} with a YAML config")
    config = load_yaml(entry.yaml_path, resolve_func=True)
    for key in ("tag", "group"):
        config.pop(key, None)
    return config


def benchmark_tasks(benchmark: str, languages: Sequence[str],
                    data_dir: str | Path | None = None) -> dict[str, TaskEntry]:
    """lm-eval config dicts for ``benchmark`` in each language that has it."""
    if benchmark not in BENCHMARKS:
        raise SuiteError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    out: dict[str, TaskEntry] = {}
    for lang in languages:
        name = tasks_for(lang).get(benchmark)
        if name is None:
            log.info("%s has no %s task; skipped", lang, benchmark)
            continue
        if name not in task_manager().task_index:
            raise SuiteError(f"lm-eval has no task {name!r} ({benchmark}, {lang})")
        folder = Path(data_dir).expanduser() / name if data_dir else None
        if folder is not None and not folder.is_dir():
            raise SuiteError(f"{folder}: no local data for {name} ({benchmark}, {lang})")
        for leaf in _leaves(name):
            config = _registered_config(leaf)
            if folder is not None:
                config = _local_dataset(config, folder, leaf)
            out[leaf] = (config, benchmark, lang)
    return out


def _read_sentences(path: Path) -> dict[Any, str]:
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    table = pq.read_table(path) if path.suffix == ".parquet" else pj.read_json(path)
    missing = {"id", "text"} - set(table.column_names)
    if missing:
        raise SuiteError(f"{path}: FLORES data needs columns id and text; missing "
                         f"{', '.join(sorted(missing))}")
    return dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist(),
                    strict=True))


def _flores_pairs(source: str, target: str, split: str = "devtest", **_: Any) -> Any:
    """The dataset of one direction: source and target sentences joined by id."""
    import datasets

    src, tgt = _read_sentences(Path(source)), _read_sentences(Path(target))
    rows = [{"id": str(i), "source": src[i], "target": tgt[i]} for i in src if i in tgt]
    if not rows:
        raise SuiteError(f"{source} and {target} share no sentence id")
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def flores_tasks(languages: Sequence[str], pivot: str, data_dir: str | Path | None,
                 split: str = "devtest") -> dict[str, TaskEntry]:
    """Translation pivot → language (task ``flores_into``) and back (``flores_from``)."""
    import yaml

    require_data_dir(["flores"], data_dir)
    base = yaml.safe_load(FLORES_YAML.read_text(encoding="utf-8"))
    folder = Path(data_dir).expanduser() / "flores200" / split

    def sentences(tag: str) -> Path:
        path = _local_file(folder, tag)
        if path is None:
            raise SuiteError(f"{folder}: no FLORES sentences for {tag} ({tag}.parquet or "
                             f"{tag}.jsonl)")
        return path.resolve()

    out: dict[str, TaskEntry] = {}
    pivot_name = get_language(pivot).name
    for lang in languages:
        if lang == pivot:
            continue
        name = get_language(lang).name
        for task, (src, tgt), (src_name, tgt_name) in (
                ("flores_into", (pivot, lang), (pivot_name, name)),
                ("flores_from", (lang, pivot), (name, pivot_name))):
            config = {
                **base, "task": f"{task}_{src}-{tgt}", "test_split": split,
                "custom_dataset": _flores_pairs,
                "dataset_kwargs": {"source": str(sentences(src)), "target": str(sentences(tgt)),
                                   "split": split},
                "doc_to_text": (f"Translate this sentence from {src_name} to {tgt_name}.\n"
                                f"{src_name}: {{{{source}}}}\n{tgt_name}:"),
            }
            out[config["task"]] = (config, task, lang)
    return out


def perplexity_tasks(languages: Sequence[str], data_dir: str | Path | None
                     ) -> dict[str, TaskEntry]:
    """Rolling log-likelihood of held-out text per language."""
    from components.evaluate.synthetic import lm_task

    require_data_dir(["perplexity"], data_dir)
    folder = Path(data_dir).expanduser() / "perplexity"
    out: dict[str, TaskEntry] = {}
    for lang in languages:
        path = _local_file(folder, lang)
        if path is None:
            raise SuiteError(f"{folder}: no held-out text for {lang} ({lang}.jsonl or "
                             f"{lang}.parquet with a text column)")
        name = f"perplexity_{lang}"
        out[name] = (lm_task(name, path.resolve()), "perplexity", lang)
    return out


def build_suite_tasks(suite_names: Sequence[str], languages: Sequence[str], *,
                      world_eval_dir: str | Path | None = None,
                      data_dir: str | Path | None = None, original: Sequence[str] = (),
                      max_gen_tokens: int = 32, chat_template: bool = True
                      ) -> dict[str, TaskEntry]:
    """Every task of every suite in every language, as lm-eval config dicts."""
    unknown = [s for s in suite_names if s not in SUITES]
    if unknown:
        raise SuiteError(f"unknown suites {unknown}; known: {', '.join(SUITES)}")
    out: dict[str, TaskEntry] = {}
    for suite in dict.fromkeys(suite_names):
        kind = suites()[suite].kind
        if kind == "synthetic":
            if world_eval_dir is None:
                raise SuiteError("the synthetic suite needs the world's eval folder (a world "
                                 "run, or evaluation.data_dir holding <tag>/openbook.jsonl ...)")
            out.update(synthetic_tasks(world_eval_dir, list(languages), tasks=SYNTHETIC_TASKS,
                                       max_gen_tokens=max_gen_tokens,
                                       chat_template=chat_template))
        elif kind == "flores":
            pivot = original[0] if original else "eng_Latn"
            out.update(flores_tasks(languages, pivot, data_dir))
        elif kind == "perplexity":
            out.update(perplexity_tasks(languages, data_dir))
        else:
            out.update(benchmark_tasks(suite, languages, data_dir))
    return out
