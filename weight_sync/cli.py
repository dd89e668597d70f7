"""The ``weight-sync`` command: ``demo`` (the main job) and ``bench`` (benchmarks)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``weight-sync <command> [args...]``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="weight-sync", add_help=False,
        description="Keep RL collectors current with a learner's weights.",
    )
    parser.add_argument("command", choices=["demo", "bench"],
                        help="demo: train a policy with N synced collector processes; "
                             "bench: measure sync latency against torchrl and the raw limit")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(processName)s %(name)s: %(message)s")
    if args.command == "demo":
        from collectors.demo import main as demo_main

        return demo_main(rest)
    # torchrl's wheel installs a top-level "benchmarks" folder that would shadow ours:
    # the benchmarks run from a checkout of this repository, so put its root first.
    root = Path(__file__).resolve().parents[1]
    if (root / "benchmarks" / "bench.py").exists() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.bench import main as bench_main

    return bench_main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
