"""Every key weight-sync writes to the TCPStore, defined here and nowhere else.

All keys live under the prefix ``ws/<name>/`` (one namespace per weight stream, so
one store can carry several). ``<cid>`` is a collector id, ``<inc>`` its incarnation
(1 for its first connect, +1 each time a process with that id joins again), ``<seq>``
the per-link message number (0 = the initial sync), ``<v>`` a weight version.

=============================  =========  =========  ====================================
key                            written by read by    meaning
=============================  =========  =========  ====================================
``layout``                     learner    collector  JSON layout (name, shape, dtype)
``info``                       learner    collector  JSON ConnectionInfo, for collectors
                                                     started with only an address
``join/<cid>``                 collector  learner    counter; ``add(+1)`` = incarnation
``joins``                      collector  learner    counter of all joins (cheap to poll)
``hello/<cid>/<inc>``          collector  learner    JSON: pid, host, digest, refusal
``admit/<cid>/<inc>``          learner    collector  ``ok`` / ``ok shm`` (shared memory), or
                                                     why the learner refused it
``pair/<cid>/<inc>/...``       torch      torch      rendezvous of the link's pair group
``update/<cid>/<inc>/<seq>``   learner    collector  "message seq carries version v":
                                                     ``v``, or ``v <segment>`` when it
                                                     waits in shared memory; ``-1`` =
                                                     the learner closed
``ack/<cid>/<inc>/<v>``        collector  learner    version v is applied
``alive/<cid>/<inc>``          collector  learner    heartbeat counter, ``add(+1)`` per beat
``bye/<cid>/<inc>``            collector  learner    the collector read the learner's close
=============================  =========  =========  ====================================

A collector waits for ``update/.../<seq>`` with a blocking ``get`` (bounded), then
receives exactly one message on its pair group. The learner sends message ``seq+1``
only once ``seq`` is acked, so a transfer never waits on a busy collector and a slow
collector is handed the newest version, never a queue of old ones. It also means that
when message ``seq+1`` arrives, ``update/<seq>`` and the previous message's ``ack`` have
been read: the collector deletes them then, off the latency path, so a long run keeps
a bounded number of keys per collector.
"""

from __future__ import annotations

__all__ = ["ADMITTED", "ADMITTED_SHM", "CLOSED", "Keys"]

#: Value of an ``update`` key telling the collector that the learner closed.
CLOSED = -1
#: Value of an ``admit`` key that lets the collector build its link.
ADMITTED = "ok"
#: Value of an ``admit`` key that lets the collector build a shared-memory link.
ADMITTED_SHM = "ok shm"


class Keys:
    """Key names of one weight stream. The only place that spells a key."""

    def __init__(self, name: str) -> None:
        self.prefix = f"ws/{name}/"

    @property
    def layout(self) -> str:
        return self.prefix + "layout"

    @property
    def info(self) -> str:
        return self.prefix + "info"

    @property
    def joins(self) -> str:
        return self.prefix + "joins"

    def join(self, cid: int) -> str:
        return f"{self.prefix}join/{cid}"

    def hello(self, cid: int, inc: int) -> str:
        return f"{self.prefix}hello/{cid}/{inc}"

    def admit(self, cid: int, inc: int) -> str:
        return f"{self.prefix}admit/{cid}/{inc}"

    def pair_prefix(self, cid: int, inc: int) -> str:
        return f"{self.prefix}pair/{cid}/{inc}/"

    def update(self, cid: int, inc: int, seq: int) -> str:
        return f"{self.prefix}update/{cid}/{inc}/{seq}"

    def ack(self, cid: int, inc: int, version: int) -> str:
        return f"{self.prefix}ack/{cid}/{inc}/{version}"

    def alive(self, cid: int, inc: int) -> str:
        return f"{self.prefix}alive/{cid}/{inc}"

    def bye(self, cid: int, inc: int) -> str:
        return f"{self.prefix}bye/{cid}/{inc}"
