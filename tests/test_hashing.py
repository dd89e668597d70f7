"""The message hashes with and without their optional libraries (the ``fast`` extra):
the learner names what it used, a collector computes the same, and one that lacks the
library says so instead of refusing good messages as corrupt."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from weight_sync.errors import ConfigError
from weight_sync.wire import hashing
from weight_sync.wire.layout import BufferLayout
from weight_sync.wire.packing import check_payload, write_header

ROOT = Path(__file__).resolve().parents[1]


def stamped() -> tuple[torch.Tensor, BufferLayout]:
    weights = {"w": torch.arange(1000, dtype=torch.float32)}
    layout = BufferLayout.from_weights(weights)
    buffer = torch.zeros(layout.nbytes, dtype=torch.uint8)
    buffer[-4000:] = torch.arange(4000) % 251
    write_header(buffer, layout, 3, checksum=True)
    return buffer, layout


def test_each_checksum_kind_catches_a_flipped_bit() -> None:
    data = bytearray(range(256)) * 64
    for kind in (hashing.XXH3_64, hashing.CRC32):
        if kind == hashing.XXH3_64 and hashing._xxhash is None:
            continue
        before = hashing.checksum(memoryview(data), kind)
        data[100] ^= 1
        assert hashing.checksum(memoryview(data), kind) != before
        data[100] ^= 1


def test_a_digest_names_its_algorithm_and_is_checked_with_it() -> None:
    data = memoryview(b"weights" * 100)
    sha = hashing.digest(data, like="sha256:")
    assert sha.startswith("sha256:") and hashing.same_digest(data, sha)
    assert not hashing.same_digest(memoryview(b"other"), sha)
    if hashing._blake3 is not None:
        assert hashing.digest(data).startswith("blake3:")


def test_a_collector_without_xxhash_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    if hashing._xxhash is None:
        pytest.skip("xxhash is not installed: nothing stamps XXH3 here")
    buffer, _ = stamped()
    monkeypatch.setattr(hashing, "_xxhash", None)
    with pytest.raises(ConfigError, match=r"weight-sync\[fast\]"):
        check_payload(buffer, "collector 0")


# A process where xxhash and blake3 cannot be imported: a learner and a collector (in
# threads) sync three versions, with a secret (digests) and without (checksums).
_WITHOUT_FAST = r'''
import sys, threading
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("xxhash", "blake3"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import torch
from weight_sync import WeightReceiver, WeightSender
from weight_sync.wire import hashing
assert hashing.checksum_kind() == hashing.CRC32
for secret in ("", "s3cret"):
    weights = {"w": torch.zeros(1000)}
    got = {"w": torch.ones(1000)}
    with WeightSender(weights, 1, timeout=30, secret=secret) as tx:
        rx = WeightReceiver(got, tx.connection_info, 0, timeout=30, secret=secret)
        t = threading.Thread(target=rx.connect, args=(30,))
        t.start()
        tx.connect(timeout=30)
        t.join(30)
        for v in range(1, 4):
            weights["w"].fill_(v)
            tx.send_weights_async()
            assert rx.receive_weights(timeout=30) == v
            tx.wait_ack(timeout=30)
            assert torch.equal(got["w"], weights["w"])
        assert rx.refused == 0
        rx.close()
print("ok")
'''


def test_sync_works_without_the_fast_extra() -> None:
    done = subprocess.run([sys.executable, "-c", _WITHOUT_FAST], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
