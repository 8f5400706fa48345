"""What the data stage reports: every count of the statistics table, flat for MLflow."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["DataResult"]


@dataclass
class DataResult:
    """What the stage wrote and why: every count the statistics table shows."""

    out_dir: str
    seq_len: int
    languages: list[str]
    documents_in: dict[str, int]
    documents_out: dict[str, int]
    dropped: dict[str, dict[str, int]]  # language → reason → documents
    tokens_kept: dict[str, int]  # tokens (EOS included) of kept documents
    tokens_requested: dict[str, int]
    tokens_train: dict[str, int]
    tokens_validation: dict[str, int]
    partial_tokens_dropped: dict[str, int]
    share_requested: dict[str, float]
    share_realized: dict[str, float]
    bad_utf8_documents: dict[str, int]
    bad_utf8_replacements: dict[str, int]
    lid_backend: str
    lid_agreement: dict[str, float]  # dataset label → share of its documents LID agrees on
    lid_confusion: dict[str, dict[str, int]]  # dataset label → predicted tag → documents
    # the same over the documents that went into the output (after filters and dedup)
    lid_agreement_kept: dict[str, float] = field(default_factory=dict)
    lid_confusion_kept: dict[str, dict[str, int]] = field(default_factory=dict)
    # language → quality filter → documents it fails, whatever else dropped them (in
    # ``lid.mode: filter`` the LID reason wins in ``dropped``; this keeps the filters visible)
    quality_flags: dict[str, dict[str, int]] = field(default_factory=dict)
    dedup_scope: str = "language"
    mix_mode: str = "ratio"
    tokens_unused: int = 0  # kept tokens in no shard (mix cap and partial sequences)
    tokens_unused_fraction: float = 0.0
    warnings: list[str] = field(default_factory=list)
    worker_nodes: int = 0  # nodes whose unit workers read part of the corpus
    driver_bytes_received: int = 0  # pickled size of every result the driver got back
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow: ``data/<what>/<lang>``."""
        out: dict[str, float] = {}
        for name in ("documents_in", "documents_out", "tokens_kept", "tokens_requested",
                     "tokens_train", "tokens_validation", "partial_tokens_dropped",
                     "share_requested", "share_realized", "bad_utf8_replacements",
                     "lid_agreement", "lid_agreement_kept"):
            for lang, value in getattr(self, name).items():
                out[f"data/{name}/{lang}"] = float(value)
        for lang, reasons in self.dropped.items():
            for reason, n in reasons.items():
                out[f"data/dropped/{reason}/{lang}"] = float(n)
        for lang, reasons in self.quality_flags.items():
            for reason, n in reasons.items():
                out[f"data/quality_flags/{reason}/{lang}"] = float(n)
        out["data/tokens_unused"] = float(self.tokens_unused)
        out["data/tokens_unused_fraction"] = float(self.tokens_unused_fraction)
        return out

    def table(self) -> dict[str, list[Any]]:
        """One row per language (for ``mlflow.log_table`` and the CLI)."""
        reasons = sorted({r for d in self.dropped.values() for r in d})
        rows: dict[str, list[Any]] = defaultdict(list)
        for lang in self.languages:
            rows["lang"].append(lang)
            rows["docs_in"].append(self.documents_in.get(lang, 0))
            for reason in reasons:
                rows[f"dropped_{reason}"].append(self.dropped.get(lang, {}).get(reason, 0))
            rows["docs_out"].append(self.documents_out.get(lang, 0))
            rows["tokens_requested"].append(self.tokens_requested.get(lang, 0))
            rows["tokens_train"].append(self.tokens_train.get(lang, 0))
            rows["tokens_validation"].append(self.tokens_validation.get(lang, 0))
            rows["share_requested"].append(round(self.share_requested.get(lang, 0.0), 4))
            rows["share_realized"].append(round(self.share_realized.get(lang, 0.0), 4))
            rows["lid_agreement"].append(self.lid_agreement.get(lang))
            rows["lid_agreement_kept"].append(self.lid_agreement_kept.get(lang))
        return dict(rows)
