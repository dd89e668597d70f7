"""The ``weight-sync`` command: ``demo`` (the main job) and ``bench`` (benchmarks)."""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``weight-sync <command> [args...]``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="weight-sync",
        description="Keep RL collectors current with a learner's weights.",
    )
    parser.add_argument("command", choices=["demo", "bench"],
                        help="demo: train a policy with N synced collector processes; "
                             "bench: measure sync latency against torchrl and the raw limit")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(processName)s %(name)s: %(message)s")
    if args.command == "demo":
        from collectors.demo import main as demo_main

        return demo_main(rest)
    from benchmarks.bench import main as bench_main

    return bench_main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
