"""The base class of every config section (its own module so that sections can live apart)."""

from __future__ import annotations

from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    PrivateAttr,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    model_serializer,
)

from components.config.names import mask_paths


class _Section(BaseModel):
    """Base of every section: unknown keys are errors, values are immutable once loaded.
    ``_secret_paths`` are the key paths (set by the loader) whose values came from a
    credential-named ``${VAR}``: a JSON dump masks them."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    _secret_paths: tuple[tuple[Any, ...], ...] = PrivateAttr(default=())

    @model_serializer(mode="wrap")
    def _mask_interpolated(self, handler: SerializerFunctionWrapHandler,
                           info: SerializationInfo) -> Any:
        data = handler(self)
        if self._secret_paths and info.mode_is_json():
            data = mask_paths(data, self._secret_paths)
        return data
