"""Package boundaries: what ``import weight_sync`` loads, and what the CLI says when an
extra or the checkout is missing.

Each import check runs in a fresh interpreter (this one has long since imported
everything), with this checkout first on ``PYTHONPATH``.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from weight_sync import cli

ROOT = Path(__file__).resolve().parents[1]
EXTRAS_ONLY = {"torchrl", "gymnasium", "rich", "matplotlib", "ray"}
"""Installed by the ``collectors``/``bench``/``ray`` extras; the library must not need them."""


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", ["weight_sync", "weight_sync.cli"])
def test_import_loads_only_the_core(module: str, tmp_path: Path) -> None:
    proc = _python(f"""
        import sys, {module}
        assert {module}.__file__.startswith({str(ROOT)!r}), {module}.__file__
        heavy = {sorted(EXTRAS_ONLY | {"collectors", "benchmarks"})!r}
        loaded = sorted(set(heavy) & {{m.split(".")[0] for m in sys.modules}})
        assert not loaded, f"import {module} loaded {{loaded}}"
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_import_weight_sync_exact_check(tmp_path: Path) -> None:
    # The check of the issue, verbatim.
    proc = _python("import sys, weight_sync; assert not {'torchrl','gymnasium','rich',"
                   "'matplotlib'} & set(sys.modules)", tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_demo_without_collectors_extra(tmp_path: Path) -> None:
    """torchrl/gymnasium/rich not installed: a message naming the extra, exit 2."""
    proc = _python("""
        import sys

        class NotInstalled:  # as if the 'collectors' extra were not installed
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"torchrl", "gymnasium", "rich"}:
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, NotInstalled())
        from weight_sync.cli import main
        raise SystemExit(main(["demo", "--iterations", "1"]))
    """, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'weight-sync[collectors]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_outside_a_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Installed from a wheel: no benchmarks/bench.py next to the package (site-packages
    may still hold torchrl's own ``benchmarks`` folder)."""
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "conftest.py").write_text("")  # torchrl's, not ours
    assert cli.import_benchmarks(tmp_path) is None
    monkeypatch.setattr(cli, "CHECKOUT_ROOT", tmp_path)
    assert cli.main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert f"no benchmarks/bench.py in {tmp_path}" in err
    assert "clone" in err and "python -m benchmarks.bench --quick" in err
    assert "Traceback" not in err


def test_bench_found_despite_torchrls_benchmarks(tmp_path: Path) -> None:
    """A ``benchmarks`` namespace package (as torchrl's wheel installs) imported first,
    the checkout not on sys.path: ``import_benchmarks`` still loads the checkout's."""
    (tmp_path / "site" / "benchmarks").mkdir(parents=True)
    proc = _python(f"""
        import sys
        from pathlib import Path
        from weight_sync import cli
        sys.path[:] = [p for p in sys.path if p not in ("", {str(ROOT)!r})]
        sys.path.append({str(tmp_path / "site")!r})
        import benchmarks
        assert {str(tmp_path / "site" / "benchmarks")!r} in list(benchmarks.__path__)
        assert {str(ROOT / "benchmarks")!r} not in list(benchmarks.__path__)
        main = cli.import_benchmarks(Path({str(ROOT)!r}))
        assert main is not None and main.__module__ == "benchmarks.bench"
        assert sys.modules["benchmarks"].__file__ == {str(ROOT / "benchmarks" / "__init__.py")!r}
        assert sys.path[0] == {str(ROOT)!r}
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_worker_spec_has_no_default_rollout() -> None:
    """The generic worker must be told its rollout (no CartPole ``collect`` default)."""
    pytest.importorskip("torchrl")  # collectors/ needs the 'collectors' extra
    from weight_sync.collectors.worker import WorkerSpec

    field = {f.name: f for f in dataclasses.fields(WorkerSpec)}["collect_fn"]
    assert field.default is dataclasses.MISSING
    assert field.default_factory is dataclasses.MISSING
