"""The learner of the ``transport="auto"`` tests, driven line by line from its stdin:
``python auto_nodes.py <json args>``. Collectors are :mod:`relay_nodes`' (each checks
every version it applies against :func:`relay_nodes.weights_at`).

The learner builds its sender with default settings but its address, prints its
connection info, connects ``n`` collectors, prints their placements, then obeys:

* ``send``: publish the next version and wait for its acks; print the version, the
  collectors that failed meanwhile, and the placements;
* ``join <ids>``: wait for those ids to (re)join and catch up; print the placements;
* ``close``: close the stream and print the stats by placement.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from relay_nodes import emit, set_version, weights_at

from weight_sync import WeightSender
from weight_sync.errors import CollectorFailed


def learner(args: dict[str, Any]) -> None:
    weights = weights_at(0, args["numel"])
    with WeightSender(weights, args["n"], host=args["address"],
                      liveness_timeout=args.get("liveness", 10.0)) as tx:
        emit(info=tx.connection_info.to_json())
        tx.connect(timeout=90)
        emit(transports=tx.transports, local={c: link.local for c, link in tx.links.items()})
        for command in sys.stdin:
            word, *rest = command.split()
            if word == "send":
                set_version(weights, tx.version + 1)
                tx.send_weights_async()
                failed: list[int] = []
                try:
                    tx.wait_ack(timeout=60)
                except CollectorFailed as exc:
                    failed = sorted(exc.result.failed)
                emit(version=tx.version, failed=failed, transports=tx.transports)
            elif word == "join":
                tx.wait_for([int(c) for c in rest], timeout=90)
                emit(transports=tx.transports)
            elif word == "close":
                break
        stats = tx.stats.by_placement()
        tx.close()
        emit(report=True, stats=stats)


if __name__ == "__main__":
    learner(json.loads(sys.argv[1]))
