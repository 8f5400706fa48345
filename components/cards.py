"""Model cards as the Hugging Face hub reads them: YAML front matter, then a short body.

Every model folder the package writes (upcycled, trained, grafted) gets its ``README.md`` from
here, so all cards agree on one shape: ``base_model`` (hub ids where the inputs are known by
one), ``base_model_relation`` (``finetune``, ``merge``, … as the hub defines them), ``language``
(ISO 639-1 where one exists), ``license`` inherited from the inputs' cards, ``tags``, and — once
the evaluation has run — ``model-index`` with the scores. Cards name their inputs, never the
local folders they were built in: a card is published with the model, and a path such as
``/scratch/alice/runs/x/models/cpt_moe.tmp-59d6…`` means nothing (and says too much) elsewhere.

The front matter is built with huggingface_hub's ``ModelCardData`` (the hub's own schema for
``model-index``), which needs no network.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from components.languages import to_iso639_1
from components.storage import OutputFile, StageDir, atomic_write_bytes, sha256_file

__all__ = ["CARD", "add_results", "clean_title", "model_index", "model_ref", "portable",
           "portable_text", "read_card", "render_card", "write_card"]

CARD = "README.md"
RELATIONS = ("adapter", "merge", "quantized", "finetune")
"""``base_model_relation`` values the hub knows."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_CACHE = re.compile(r"models--([^/]+?)--([^/]+)(?:/|$)")
_TMP = re.compile(r"\.tmp-[0-9a-f]+")


def clean_title(name: str) -> str:
    """A folder name without the build suffix (``cpt_moe.tmp-59d6…`` → ``cpt_moe``)."""
    return _TMP.sub("", Path(str(name).rstrip("/")).name)


def read_card(model_dir: str | Path) -> dict[str, Any]:
    """The front matter of a folder's ``README.md`` ({} when there is none or it is not YAML)."""
    path = Path(model_dir) / CARD
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def model_ref(model: str | Path) -> str:
    """How a card names an input model: its hub id when one is known (the id itself, a hub-cache
    snapshot folder, a card's ``model_id``, a config's ``_name_or_path``, the ``base_model`` of
    an upcycled or trained step this package wrote), else a short relative name
    (``models/cpt_moe``), never an absolute local path."""
    text = str(model)
    path = Path(text).expanduser()
    if not path.exists() and _HUB_ID.match(text):
        return text
    if "://" in text:
        return text  # a storage URI is meaningful to a team that shares the bucket
    cache = _HUB_CACHE.search(path.as_posix())
    if cache:
        return f"{cache.group(1)}/{cache.group(2)}"
    card = read_card(path)
    declared = card.get("model_id")
    if isinstance(declared, str) and _HUB_ID.match(declared):
        return declared
    if "deltamoe" in (card.get("tags") or []) and card.get("base_model_relation") == "finetune" \
            and isinstance(card.get("base_model"), str):
        return card["base_model"]  # an unpublished step of this package: name what it came from
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    named = config.get("_name_or_path") if isinstance(config, dict) else None
    if isinstance(named, str) and _HUB_ID.match(named) and not Path(named).exists():
        return named
    return portable(text)


def portable(value: Any) -> Any:
    """``value`` with every absolute local path shortened to its last two parts (build suffixes
    dropped): ``/tmp/x/runs/demo/models/cpt_moe`` → ``models/cpt_moe``. Recurses into dicts and
    lists, so lineage blocks can be passed whole."""
    if isinstance(value, Mapping):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if isinstance(value, str) and (value.startswith("/") or value.startswith("~")) \
            and "\n" not in value:
        parts = [clean_title(p) for p in Path(value).parts[1:]][-2:]
        return "/".join(parts) if parts else "."
    return value


def _languages(tags: Iterable[str]) -> list[str]:
    out: list[str] = []
    for tag in tags:
        try:
            code = to_iso639_1(tag) or tag.split("_")[0]
        except (KeyError, ValueError):
            continue  # a language-group name, not a language
        if code not in out:
            out.append(code)
    return out


def _inherited(inputs: Sequence[str | Path]) -> dict[str, Any]:
    """``license`` and ``language`` from the inputs' cards: the first input that declares one
    gives the license (a post-trained model's licence binds its derivatives); languages are the
    union."""
    out: dict[str, Any] = {}
    languages: list[str] = []
    for model in inputs:
        card = read_card(model)
        for key in ("license", "license_name", "license_link"):
            if key in card and key not in out:
                out[key] = card[key]
        found = card.get("language") or []
        for code in [found] if isinstance(found, str) else found:
            if code not in languages:
                languages.append(str(code))
    if languages:
        out["language"] = languages
    return out


def _results(rows: Iterable[Any]) -> list[Any]:
    """``model-index`` entries, one per (task, language, metric) row of the evaluation."""
    from huggingface_hub import EvalResult

    results = []
    for row in rows:
        get = row.get if isinstance(row, Mapping) else lambda k, r=row: getattr(r, k)
        task, lang, metric = str(get("task")), str(get("lang")), str(get("metric"))
        results.append(EvalResult(
            task_type="text-generation", dataset_type=task, dataset_name=f"{task} ({lang})",
            dataset_config=lang, metric_type=metric, metric_name=metric,
            metric_value=round(float(get("value")), 6), verified=False))
    return results


def render_card(title: str, body: str, *, base_model: Sequence[str] = (),
                relation: str | None = None, languages: Sequence[str] = (),
                inputs: Sequence[str | Path] = (), tags: Sequence[str] = (),
                results: Iterable[Any] = (), extra: Mapping[str, Any] | None = None) -> str:
    """The card text: front matter, ``# title`` (build suffix dropped), ``body``.

    ``languages`` are canonical tags (``swh_Latn``), written as ISO 639-1; ``inputs`` are the
    model folders whose cards lend ``license`` and further ``language`` entries.
    """
    from huggingface_hub import ModelCardData

    if relation is not None and relation not in RELATIONS:
        raise ValueError(f"base_model_relation {relation!r}: expected one of "
                         f"{', '.join(RELATIONS)}")
    name = clean_title(title)
    inherited = _inherited(inputs)
    language = _languages(languages)
    language += [c for c in inherited.pop("language", []) if c not in language]
    refs = [model_ref(m) for m in base_model]
    evals = _results(results)
    data = ModelCardData(
        base_model=(refs[0] if len(refs) == 1 else refs) or None,
        base_model_relation=relation if refs else None, language=language or None,
        library_name="transformers", pipeline_tag="text-generation",
        tags=list(dict.fromkeys(["deltamoe", *tags])), model_name=name if evals else None,
        eval_results=evals or None, **inherited, **dict(extra or {}))
    return f"---\n{data.to_yaml()}\n---\n\n# {name}\n\n{portable_text(body).strip()}\n"


def portable_text(text: str) -> str:
    """Free text with absolute local paths shortened as :func:`portable` does."""
    return re.sub(r"(?<![\w:/.)\]])(/[\w.~+-]+(?:/[^\s`'\",)]+)+)",
                  lambda m: str(portable(m.group(1))), text)


def write_card(out_dir: str | Path, title: str, body: str, **kwargs: Any) -> Path:
    """Write ``<out_dir>/README.md`` (see :func:`render_card` for the arguments)."""
    path = Path(out_dir) / CARD
    path.write_text(render_card(title, body, **kwargs), encoding="utf-8")
    return path


def model_index(name: str, rows: Iterable[Any]) -> list[dict[str, Any]]:
    """The hub's ``model-index`` block for model ``name`` from evaluation rows."""
    from huggingface_hub import ModelCardData

    evals = _results(rows)
    if not evals:
        return []
    return ModelCardData(model_name=clean_title(name), eval_results=evals).to_dict()[
        "model-index"]


def add_results(stage: StageDir, rows: Sequence[Any]) -> bool:
    """Put evaluation ``rows`` into the ``model-index`` of a completed model folder's card, and
    its new size and checksum into the folder's manifest (the weights are untouched, so the
    stage stays complete and its fingerprint the same). False when the folder is not local or
    has no card written by this package (an input model's card is never rewritten)."""
    if not stage.is_local or not rows:
        return False
    folder = Path(stage.path)
    path = folder / CARD
    manifest = stage.read_manifest()
    card = read_card(folder)
    if manifest is None or "deltamoe" not in (card.get("tags") or []):
        return False
    text = path.read_text(encoding="utf-8")
    body = re.sub(r"^---\s*\n.*?\n---\s*\n", "", text, count=1, flags=re.S)
    title = re.match(r"\s*# (.+)\n", body)
    card["model-index"] = model_index(title.group(1) if title else folder.name, rows)
    text = "---\n" + yaml.safe_dump(card, sort_keys=False, allow_unicode=True) + "---\n" + body
    atomic_write_bytes(stage.fs, str(path), text.encode("utf-8"))
    outputs = [o if o.path != CARD else OutputFile(CARD, path.stat().st_size,
                                                    sha256_file(stage.fs, str(path)))
               for o in manifest.outputs]
    extra = {**manifest.extra, "card_results": len(rows)}
    atomic_write_bytes(stage.fs, stage.manifest_path,
                       replace(manifest, outputs=outputs, extra=extra).to_json().encode())
    return True
