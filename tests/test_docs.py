"""The docs cannot rot: their examples run, and the site builds in strict mode.

An example runs when the line before its fence is ``<!-- run -->``:

    <!-- run -->
    ```python
    ...
    ```

Each such block of ``README.md`` and ``docs/**/*.md`` is written to a file of its own and
run with this interpreter in a fresh process (its own session, so that the collectors it
spawns are killed with it), on loopback, bounded by :data:`TIMEOUT_S`; it passes when it
exits 0. Blocks without the marker are fragments (they name your own ``train_step``,
hosts and launchers) and are not run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120.0
"""Per example: spawning collectors and importing torch takes seconds on 2 loaded cores."""
MARKER = "<!-- run -->"
_FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>\S*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ ]*$",
                    re.MULTILINE | re.DOTALL)
README_MAX_LINES = 250


class Example(NamedTuple):
    path: Path
    line: int
    code: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").rglob("*.md")
                                        if "hooks" not in p.parts)]


def examples(path: Path) -> list[Example]:
    """The marked blocks of one file; a marker not followed by a python fence fails."""
    text = path.read_text()
    found = []
    for match in re.finditer(rf"^{re.escape(MARKER)}[ ]*\n", text, re.MULTILINE):
        line = text.count("\n", 0, match.start()) + 1
        fence = _FENCE.match(text, match.end())
        assert fence is not None and fence["lang"] == "python", (
            f"{path.relative_to(ROOT)}:{line}: {MARKER} must be followed by a ```python block")
        found.append(Example(path, line + 2, fence["body"]))
    return found


ALL_EXAMPLES = [ex for path in doc_files() for ex in examples(path)]


def test_the_docs_hold_runnable_examples() -> None:
    where = {ex.path.name for ex in ALL_EXAMPLES}
    assert {"README.md", "getting-started.md", "transports.md"} <= where, where


@pytest.mark.parametrize("example", ALL_EXAMPLES, ids=str)
def test_example_runs(example: Example, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(example.code)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("WEIGHT_SYNC_SECRET", None)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{example} ran past {TIMEOUT_S:.0f}s:\n{out[-4000:]}")
    finally:
        # Whatever the example left behind (a collector it failed to join) goes with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, f"{example} exited {proc.returncode}:\n{out[-4000:]}"


def test_readme_fits_three_screens() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_readme_links_resolve() -> None:
    text = (ROOT / "README.md").read_text()
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text)
               if "://" not in t and not t.startswith("#")]
    assert targets, "the README links into the docs"
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert missing == []


def test_readme_headline_figures_are_the_committed_results() -> None:
    """Every figure of the README's headline table is in the results file it names, so
    rerunning the benchmarks without updating the README fails here."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- headline: (?P<src>\S+) -->\n(?P<body>.*?)<!-- /headline -->",
                      readme, re.DOTALL)
    assert block is not None, "README.md has no <!-- headline: FILE --> ... block"
    results = (ROOT / block["src"]).read_text()
    rows = [line for line in block["body"].splitlines()
            if line.startswith("| ") and not line.startswith("| policy")]
    assert len(rows) >= 3
    figures = [cell.strip() for row in rows for cell in row.strip("|").split("|")[3:]]
    absent = [f for f in figures if f"| {f} |" not in results]
    assert absent == [], f"not in {block['src']}: {absent}; update the README's headline"


def _missing_docs_packages() -> list[str]:
    return [name for name in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
            if importlib.util.find_spec(name.split(".")[0]) is None
            or (name.count(".") and importlib.util.find_spec(name) is None)]


def test_docs_build_strict(tmp_path: Path) -> None:
    missing = _missing_docs_packages()
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: pip install -e '.[docs]'")
    site = tmp_path / "site"
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                          "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    # The API reference is generated from the docstrings, the collectors included...
    reference = (site / "reference" / "collectors" / "index.html").read_text()
    assert "weight_sync.collectors.CollectorGroup" in reference
    # ... and the benchmark pages are read from the results folder.
    sweep = (site / "benchmarks" / "sweep" / "index.html").read_text()
    assert "latency_vs_size.png" in sweep
    assert (site / "benchmarks" / "fanout.png").read_bytes() == (
        ROOT / "benchmarks" / "results" / "fanout.png").read_bytes()
