"""What the schema's values may be: secrets and their mask, language tags, and the names each
registry holds (read from the registry when a value is checked, so each list of names lives
once and the schema stays cheap to import)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from typing import Annotated, Any

from pydantic import AfterValidator, FieldSerializationInfo, field_serializer

SECRET_KEY = re.compile(
    r"(token|secret|passw(or)?d|api[_-]?key|access[_-]?key|private[_-]?key|credential|auth)",
    re.IGNORECASE,
)
"""Key names whose values are secrets wherever they appear (storage options, env blocks)."""
SECRET_MASK = "**********"  # what pydantic prints for a SecretStr


def mask_secrets(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the values of secret-looking keys masked, at any depth."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, dict):
            out[key] = mask_secrets(value)
        elif SECRET_KEY.search(str(key)) and value not in (None, ""):
            out[key] = SECRET_MASK
        else:
            out[key] = value
    return out


class _MaskedOptions:
    """Mixin: ``storage_options`` keep their values in Python but dump masked as JSON, so
    credentials reach fsspec and never a fingerprint, a manifest or MLflow."""

    @field_serializer("storage_options", when_used="json", check_fields=False)
    def _mask(self, options: dict[str, Any], _info: FieldSerializationInfo) -> dict[str, Any]:
        return mask_secrets(options)


def _lang_tag(value: str) -> str:
    # Imported here so that the schema module stays importable while languages load lazily.
    from components.languages import canonical_tag

    return canonical_tag(value)


LangTag = Annotated[str, AfterValidator(_lang_tag)]
"""A language code normalised to its canonical iso639-3_Script tag (``sw`` → ``swh_Latn``)."""


def _registered(what: str, names: Callable[[], Iterable[str]]) -> AfterValidator:
    """A validator accepting the names of one registry, read when a value is checked: each list
    of names lives once, in its registry, and the schema stays cheap to import."""

    def check(value: str) -> str:
        known = list(names())
        if value not in known:
            close = difflib.get_close_matches(value, known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown {what} {value!r}; {hint}known: {', '.join(known)}")
        return value

    return AfterValidator(check)


def _formats() -> Iterable[str]:
    from components.data.readers import READERS

    return READERS


def _dense_types() -> Iterable[str]:
    from components.moe.families import DENSE_TYPES

    return DENSE_TYPES


def _methods() -> Iterable[str]:
    from components.delta.methods import METHODS

    return METHODS


def _baselines() -> Iterable[str]:
    from components.variants import BASELINES

    return BASELINES


def _variants() -> Iterable[str]:
    from components.variants import VARIANTS

    return VARIANTS


def _suites() -> Iterable[str]:
    from components.evaluate.catalog import suites

    return suites()


SourceFormat = Annotated[str, _registered("source format", _formats)]
DenseType = Annotated[str, _registered("model family", _dense_types)]
GraftMethod = Annotated[str, _registered("graft method", _methods)]
Baseline = Annotated[str, _registered("baseline variant", _baselines)]
VariantName = Annotated[str, _registered("variant", _variants)]
Suite = Annotated[str, _registered("evaluation suite", _suites)]
