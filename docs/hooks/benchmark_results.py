"""mkdocs hook: the docs read the benchmarks' committed results, never a copy of them.

``benchmarks/results/`` (the one results folder) is published under ``benchmarks/`` in
the site: its plots and JSON as they are, its ``RESULTS.md`` (rendered from a
``weight-sync bench`` JSON by ``benchmarks.report``) as the page ``benchmarks/sweep.md``.
A page asks for a table rendered from a kept JSON with a line of its own::

    <!-- results-table: fanout.json -->

which is replaced by the table that the benchmark that wrote the file prints itself
(its module's ``table``), so the docs and the benchmark's own output cannot disagree.
A marker naming a file or a kind that does not exist fails the build.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
SITE_DIR = "benchmarks"
SWEEP_PAGE = f"{SITE_DIR}/sweep.md"
MARKER = re.compile(r"^<!-- results-table: (?P<name>[\w.-]+\.json)(?: (?P<arg>\w+))? -->$",
                    re.MULTILINE)


def _renderer(name: str) -> Callable[..., str]:
    """The ``table`` of the benchmark module that writes ``name`` (its stem's prefix)."""
    from weight_sync.cli import import_benchmarks

    if import_benchmarks(ROOT) is None:
        raise PluginError(f"no benchmarks package under {ROOT}")
    if name.startswith("fanout"):
        from benchmarks import fanout

        return fanout.table
    if name.startswith("wire_formats"):
        from benchmarks import wire_formats

        return wire_formats.table
    raise PluginError(f"no table renderer for {name!r} (fanout*.json, wire_formats*.json)")


def on_files(files: Files, config: MkDocsConfig) -> Files:
    if not (RESULTS / "RESULTS.md").is_file():
        raise PluginError(f"{RESULTS / 'RESULTS.md'} is missing: the benchmarks page reads it")
    for path in sorted(RESULTS.iterdir()):
        if path.suffix in (".png", ".json"):
            files.append(File.generated(config, f"{SITE_DIR}/{path.name}", abs_src_path=str(path)))
    files.append(File.generated(config, SWEEP_PAGE,
                                content=(RESULTS / "RESULTS.md").read_text()))
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    def table(match: re.Match[str]) -> str:
        name, arg = match["name"], match["arg"]
        path = RESULTS / name
        if not path.is_file():
            raise PluginError(f"{page.file.src_uri}: {match[0]} names a missing file {path}")
        report: dict[str, Any] = json.loads(path.read_text())
        rendered = _renderer(name)(report, arg) if arg else _renderer(name)(report)
        return f"{rendered}\n\n*Rendered from [`{name}`]({_link(page, name)}).*"

    return MARKER.sub(table, markdown)


def _link(page: Page, name: str) -> str:
    depth = page.file.src_uri.count("/")
    return "../" * depth + f"{SITE_DIR}/{name}"
