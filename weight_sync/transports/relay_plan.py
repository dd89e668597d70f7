"""Who a relay collector receives from: the topology, as a pure function.

Hosts first: on each host the first collector that is not marked slow is the host's
*head* and receives from the network; the host's other collectors receive from their
head (no second copy crosses the host's link). Heads form a tree in the order their
hosts joined, the learner at its root with ``fanout`` children and every head with
``fanout`` children of its own: ``fanout=1`` is a chain (every link carries one copy
per version whatever N, the learner's included; a version takes one transfer plus a
small delay per hop), larger fan-outs trade link bandwidth (each head sends
``fanout`` copies) for depth (``log_fanout`` of the hosts).

A collector its children had to abandon (it stalled or was too slow, see
:class:`~weight_sync.config.RelayConfig`) is marked slow and becomes a leaf: a child of
its host's head, or of the last head when its host has no other collector.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Node", "plan", "LEARNER"]

#: The parent id that means the learner itself.
LEARNER = -1


@dataclass(frozen=True)
class Node:
    """A relay collector as the planner sees it."""

    collector_id: int
    host: str
    slow: bool = False


def plan(nodes: list[Node], fanout: int) -> dict[int, int]:
    """Each node's parent (a collector id, or :data:`LEARNER`), for ``nodes`` in join
    order."""
    hosts: dict[str, list[Node]] = {}
    for node in nodes:
        hosts.setdefault(node.host, []).append(node)
    heads: list[Node] = []
    parents: dict[int, int] = {}
    leaves: list[Node] = []
    for members in hosts.values():
        healthy = [n for n in members if not n.slow]
        if not healthy:
            leaves.extend(members)
            continue
        head = healthy[0]
        heads.append(head)
        for node in members:
            if node is not head:
                parents[node.collector_id] = head.collector_id
    for i, head in enumerate(heads):
        parents[head.collector_id] = (LEARNER if i < fanout
                                      else heads[(i - fanout) // fanout].collector_id)
    last = heads[-1].collector_id if heads else LEARNER
    for node in leaves:
        parents[node.collector_id] = last
    return parents
