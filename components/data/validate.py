"""Checks of the data section that need the sources themselves, for ``config validate``.

Schema validation cannot see the disk: a config asking for ``zh`` (``zho_Hans``) validated and
the stage failed 20 s later with ``no source has data for zho_Hans``. This resolves every local
source with its reader (folder listings only, nothing read) and reports, per language and per
source, what it looked for and what the source has. Remote sources are left to the stage:
listing an object store from a laptop is slow and may need credentials the cluster has.
"""

from __future__ import annotations

import fsspec

from components.config import DataConfig
from components.data.errors import DataError
from components.data.readers import reader_for, resolve_source

__all__ = ["source_issues"]


def source_issues(data: DataConfig, languages: list[str],
                  run_dir: str | None = None) -> list[tuple[str, str]]:
    """``(key path, message)`` for each local source that cannot serve the run's languages."""
    issues: list[tuple[str, str]] = []
    covered: set[str] = set()
    layouts: list[str] = []
    all_layout = bool(data.sources)
    for i, source in enumerate(data.sources):
        path = source.path
        if "{run_dir}" in path:
            if run_dir is None:
                all_layout = False  # made by an earlier stage: nothing to check yet
                continue
            path = path.replace("{run_dir}", run_dir)
        if fsspec.utils.get_protocol(path) not in ("file", "local"):
            all_layout = False  # remote: no listing (its client may not even be installed)
            continue
        fs, _ = fsspec.core.url_to_fs(path, **source.storage_options)
        try:
            plan = resolve_source(source, languages, run_dir)
        except DataError as err:
            issues.append((f"data.sources.{i}", str(err)))
            continue
        covered.update(plan.languages)
        if not plan.reader.finds_languages:
            all_layout = False
            continue
        has = plan.reader.available(plan.path, fs) or []
        layouts.append(f"{source.name!r} has {', '.join(has) or 'no language folders'}")
    if all_layout and not issues:
        for tag in languages:
            if tag not in covered:
                looked = ", ".join(sorted({reader_for(s.format)(s).layout_tag(tag)
                                           for s in data.sources}))
                issues.append(("data.sources", f"no source has data for {tag} (looked for "
                                               f"{looked}; {'; '.join(layouts)})"))
    return issues
