"""What the schema's values may be: secrets and their mask, language tags, and the names each
registry holds (read from the registry when a value is checked, so each list of names lives
once and the schema stays cheap to import)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any

from pydantic import AfterValidator, FieldSerializationInfo, field_serializer

CREDENTIAL_KEYS = frozenset({
    # s3fs (and botocore client_kwargs)
    "key", "secret", "token", "session_token", "aws_access_key_id", "aws_secret_access_key",
    "aws_session_token",
    # gcsfs: a token (string, dict or file), service-account credentials
    "credentials", "access_token", "refresh_token", "client_secret", "private_key",
    # adlfs
    "account_key", "connection_string", "sas_token", "credential",
    # http, ssh, ftp, webhdfs
    "password", "passphrase", "headers", "authorization", "cookies",
})
"""Storage-option keys that hold credentials in the filesystems projects use (s3fs, gcsfs,
adlfs, http/sftp): masked wherever they appear, even outside ``storage_options``."""

SECRET_KEY = re.compile(
    r"(token(?!s|iz|_budget|_count)|secret|passw(or)?d|api[_-]?key|access[_-]?key"
    r"|private[_-]?key|account[_-]?key|connection[_-]?string|sas[_-]?token|credential"
    r"|auth(?!or)"
    rf"|^({'|'.join(sorted(CREDENTIAL_KEYS))})$)",
    re.IGNORECASE,
)
"""Key names whose values are secrets wherever they appear (storage options, env blocks,
MLflow params); ``tokenizer``, ``max_gen_tokens`` and ``token_budget`` are not."""
SECRET_VARIABLE = re.compile(
    r"(^|_)(KEY|SECRET|TOKEN|PASSWORD|PASSWD|PASS|PWD|PASSPHRASE|CREDENTIALS?|SAS|SIG"
    r"|CONNECTION_STRING|AUTH|APIKEY|PRIVATE)(_|$)",
    re.IGNORECASE,
)
"""Environment variable names that hold credentials (``HF_TOKEN``, ``AWS_ACCESS_KEY_ID``,
``AZURE_STORAGE_CONNECTION_STRING``, ``MLFLOW_TRACKING_PASSWORD``): by whole words, so that
``TOKENIZER_DIR`` is not one. A value interpolated from one is masked in every dump."""
SECRET_MASK = "**********"  # what pydantic prints for a SecretStr


def secret_variable(name: str) -> bool:
    """Whether ``${name}`` reads a credential (see :data:`SECRET_VARIABLE`)."""
    return bool(SECRET_VARIABLE.search(name))


def mask_secrets(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the values of secret-looking keys masked, at any depth."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, dict) and not SECRET_KEY.search(str(key)):
            out[key] = mask_secrets(value)
        elif SECRET_KEY.search(str(key)) and value not in (None, "", {}):
            out[key] = SECRET_MASK
        else:
            out[key] = value
    return out


def mask_all(value: Any) -> Any:
    """Every leaf value of ``value`` masked (keys and empty values kept): storage options are
    all credentials or close to them (account names, endpoints with SAS query strings), and no
    key list covers every fsspec filesystem."""
    if isinstance(value, dict):
        return {k: mask_all(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_all(v) for v in value]
    return value if value in (None, "") else SECRET_MASK


def _child(node: Any, part: Any) -> Any:
    if isinstance(node, dict):
        return node.get(part)
    if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
        return node[part]
    return None


def mask_paths(data: Any, paths: Iterable[tuple[Any, ...]]) -> Any:
    """``data`` (a JSON dump) with the value at each key path masked, in place."""
    for path in paths:
        if not path:
            continue
        node = data
        for part in path[:-1]:
            node = _child(node, part)
        if _child(node, path[-1]) is not None:
            node[path[-1]] = mask_all(node[path[-1]])
    return data


class _MaskedOptions:
    """Mixin: ``storage_options`` keep their values in Python but dump with every value masked
    as JSON, so credentials reach fsspec and never a fingerprint, a manifest or MLflow."""

    @field_serializer("storage_options", when_used="json", check_fields=False)
    def _mask(self, options: dict[str, Any], _info: FieldSerializationInfo) -> dict[str, Any]:
        return mask_all(options)


def _lang_tag(value: str) -> str:
    # Imported here so that the schema module stays importable while languages load lazily.
    from components.languages import canonical_tag

    return canonical_tag(value)


LangTag = Annotated[str, AfterValidator(_lang_tag)]
"""A language code normalised to its canonical iso639-3_Script tag (``sw`` → ``swh_Latn``)."""


def _registered(what: str, names: Callable[[], Iterable[str]],
                renamed: Callable[[], Mapping[str, str]] | None = None) -> AfterValidator:
    """A validator accepting the names of one registry, read when a value is checked: each list
    of names lives once, in its registry, and the schema stays cheap to import. A name the
    registry ``renamed`` is refused with its new name."""

    def check(value: str) -> str:
        known = list(names())
        new = renamed().get(value) if renamed is not None else None
        if value not in known and new is not None:
            raise ValueError(f"{what} {value!r} is now called {new!r}")
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


def _renamed_variants() -> Mapping[str, str]:
    from components.variants import RENAMED

    return RENAMED


def _suites() -> Iterable[str]:
    from components.evaluate.catalog import suites

    return suites()


SourceFormat = Annotated[str, _registered("source format", _formats)]
DenseType = Annotated[str, _registered("model family", _dense_types)]
GraftMethod = Annotated[str, _registered("graft method", _methods)]
Baseline = Annotated[str, _registered("baseline variant", _baselines, _renamed_variants)]
VariantName = Annotated[str, _registered("variant", _variants, _renamed_variants)]
Suite = Annotated[str, _registered("evaluation suite", _suites)]
