"""griffe extension: document ``weight_sync.collectors`` from the folder it is installed from.

The top-level ``collectors/`` folder is installed as ``weight_sync.collectors``
(``[tool.setuptools.package-dir]`` in ``pyproject.toml``), a mapping that griffe's
static loader does not follow; this attaches the folder to ``weight_sync`` under that
name when ``weight_sync`` is loaded, so the API reference shows the importable paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import griffe

COLLECTORS = Path(__file__).resolve().parents[2] / "collectors"


class CollectorsPackage(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader,
                   **kwargs: Any) -> None:
        if pkg.name != "weight_sync" or "collectors" in pkg.members:
            return
        folder = loader.load(COLLECTORS)
        loader.modules_collection.del_member("collectors")
        pkg.set_member("collectors", folder)
