"""The one run schema: everything an expansion run needs, validated before any work starts.

A run takes hours on GPUs; a typo found at the graft stage wastes all of them. So the whole
config is checked up front: unknown keys and wrong types are rejected with the YAML path (and
line) of the offending key, cross-section rules (allocation names a run language, top-k fits the
expert count) are checked here and not in the stage that would trip over them.

YAML is loaded with ``${VAR}`` / ``${VAR:-default}`` interpolation from the environment, so
cluster paths and secrets stay out of committed files. Secret fields are ``SecretStr``: they
print as ``**********`` and never reach MLflow params or fingerprints.

The schema lives in :mod:`.schema` (sections and :class:`RunConfig`), the allowed values in
:mod:`.names` (secrets, language tags, registry names) and loading in :mod:`.loading`; this
package re-exports what callers use.
"""

from __future__ import annotations

from components.config.loading import (
    ENV_PATTERN,
    ConfigError,
    dump_config,
    load_config,
    parse_config,
)
from components.config.names import SECRET_KEY, SECRET_MASK, LangTag, mask_secrets
from components.config.schema import (
    AllocationConfig,
    BaselinesConfig,
    DataConfig,
    DataSource,
    DedupConfig,
    DriverResources,
    EvaluationConfig,
    FiltersConfig,
    FilterThresholds,
    FreezeConfig,
    GraftConfig,
    LanguagesConfig,
    LIDConfig,
    MixConfig,
    ModelsConfig,
    ResourcesConfig,
    ReviewConfig,
    RunConfig,
    StageResources,
    StagesResources,
    StorageConfig,
    TrackingConfig,
    TrainConfig,
    UpcycleConfig,
    WorldConfig,
)

__all__ = [
    "ENV_PATTERN",
    "SECRET_KEY",
    "SECRET_MASK",
    "AllocationConfig",
    "BaselinesConfig",
    "ConfigError",
    "DataConfig",
    "DataSource",
    "DedupConfig",
    "DriverResources",
    "EvaluationConfig",
    "FilterThresholds",
    "FiltersConfig",
    "FreezeConfig",
    "GraftConfig",
    "LIDConfig",
    "LangTag",
    "LanguagesConfig",
    "MixConfig",
    "ModelsConfig",
    "ResourcesConfig",
    "ReviewConfig",
    "RunConfig",
    "StageResources",
    "StagesResources",
    "StorageConfig",
    "TrackingConfig",
    "TrainConfig",
    "UpcycleConfig",
    "WorldConfig",
    "dump_config",
    "load_config",
    "mask_secrets",
    "parse_config",
]
