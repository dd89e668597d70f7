"""The ``weight-sync`` command: ``demo`` (the main job) and ``bench`` (benchmarks).

Importing this module loads only the library: ``demo`` imports ``collectors`` (the
``collectors`` extra) and ``bench`` imports the checkout's ``benchmarks`` package when
they run, and each says what to install or where to run from when that fails.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["CHECKOUT_ROOT", "import_benchmarks", "main"]

CHECKOUT_ROOT = Path(__file__).resolve().parents[1]
"""Where a clone of the repository has ``benchmarks/`` (next to ``weight_sync/``)."""

# Third-party modules whose absence means "an extra is not installed", not a bug.
_DEMO_NEEDS = frozenset({"collectors", "torchrl", "gymnasium", "rich"})
_BENCH_NEEDS = ("torchrl", "matplotlib")

_NO_CHECKOUT = """\
weight-sync bench: no benchmarks/bench.py in {root}.
The benchmarks are not part of the installed package; they run from a clone of the
weight-sync repository. From the root of a clone:
    pip install torch==2.13.0 && pip install -e '.[bench]'
    weight-sync bench{args}        (or: python -m benchmarks.bench{args})"""


def import_benchmarks(root: Path | None = None) -> Callable[[list[str]], int] | None:
    """``benchmarks.bench.main`` of the checkout at ``root``, or ``None`` if there is none.

    This is the one place that deals with a name collision: torchrl's wheel installs a
    top-level ``benchmarks`` folder (a namespace package, no ``__init__.py``) into
    site-packages, so a plain ``import benchmarks`` from anywhere but the repository root
    finds torchrl's folder, not ours. Ours is a regular package, and Python prefers a
    regular package on any ``sys.path`` entry to namespace portions, so it is enough to
    put the checkout root on ``sys.path`` (in front); a plain path entry, rather than a
    module loaded by file path, because the benchmark processes are spawned and import
    ``benchmarks.*`` by name again from the ``sys.path`` they inherit. A ``benchmarks``
    imported earlier from somewhere else is dropped first.

    Args:
        root: the checkout to load from (default :data:`CHECKOUT_ROOT`).
    """
    root = (CHECKOUT_ROOT if root is None else root).resolve()
    package = root / "benchmarks"
    if not ((package / "__init__.py").is_file() and (package / "bench.py").is_file()):
        return None
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    loaded = sys.modules.get("benchmarks")
    if loaded is not None and package not in {Path(p).resolve()
                                              for p in getattr(loaded, "__path__", [])}:
        for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
            del sys.modules[name]
    bench = importlib.import_module("benchmarks.bench")
    main: Callable[[list[str]], int] = bench.main
    return main


def _missing(exc: ImportError, names: frozenset[str]) -> str | None:
    """The top-level module ``exc`` failed to find, if it is one of ``names``."""
    top = (exc.name or "").split(".")[0]
    return top if isinstance(exc, ModuleNotFoundError) and top in names else None


def _demo(rest: list[str]) -> int:
    try:
        from weight_sync.collectors.demo import main as demo_main
    except ImportError as exc:
        missing = _missing(exc, _DEMO_NEEDS)
        if missing is None:
            raise
        print(f"weight-sync demo: cannot import {missing!r} ({exc}).\n"
              "The demo needs the 'collectors' extra (torchrl, gymnasium, rich):\n"
              "    pip install 'weight-sync[collectors]'      "
              "(from a clone: pip install -e '.[collectors]')", file=sys.stderr)
        return 2
    return demo_main(rest)


def _bench(rest: list[str]) -> int:
    bench_main = import_benchmarks()
    if bench_main is None:
        args = "".join(" " + shlex.quote(a) for a in rest)
        print(_NO_CHECKOUT.format(root=CHECKOUT_ROOT, args=args), file=sys.stderr)
        return 2
    # Checked before the sweep: torchrl is imported per measurement, matplotlib at the end.
    missing = [name for name in _BENCH_NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        print(f"weight-sync bench: {', '.join(sorted(missing))} not installed. The benchmarks "
              "need the 'bench' extra; from the root of the clone:\n"
              "    pip install -e '.[bench]'", file=sys.stderr)
        return 2
    return bench_main(rest)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``weight-sync <command> [args...]``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="weight-sync", add_help=False,
        description="Keep RL collectors current with a learner's weights.",
    )
    parser.add_argument("command", choices=["demo", "bench"],
                        help="demo: train a policy with N synced collector processes "
                             "(needs the 'collectors' extra); bench: measure sync latency "
                             "against torchrl and the raw limit (from a clone of the repository)")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(processName)s %(name)s: %(message)s")
    if args.command == "demo":
        return _demo(rest)
    return _bench(rest)


if __name__ == "__main__":
    raise SystemExit(main())
