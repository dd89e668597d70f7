"""The ``cluster`` fixture: children spawned by a test are always reaped."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from faults.harness import CTX, Cluster


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        c.shutdown()
    assert not [p for p in CTX.active_children() if p in c.all_procs]
