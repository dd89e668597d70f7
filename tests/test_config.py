"""Settings: validation that quotes the bad value; ConnectionInfo is small and picklable."""

from __future__ import annotations

import dataclasses
import math
import pickle

import pytest

from weight_sync import ConnectionInfo, ReceiverConfig, SenderConfig
from weight_sync.errors import ConfigError


def _info(**overrides: object) -> ConnectionInfo:
    fields: dict[str, object] = dict(host="127.0.0.1", port=29500, name="policy",
                                     num_collectors=2)
    fields.update(overrides)
    return ConnectionInfo(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "quoted"),
    [
        ({"port": -1}, "-1"),
        ({"port": 70000}, "70000"),
        ({"port": "80"}, "'80'"),
        ({"host": ""}, "''"),
        ({"name": ""}, "''"),
        ({"name": "a/b"}, "'a/b'"),
        ({"backend": "mpi"}, "'mpi'"),
        ({"timeout": 0}, "0"),
        ({"timeout": -3.5}, "-3.5"),
        ({"timeout": math.nan}, "nan"),
        ({"timeout": math.inf}, "inf"),
        ({"timeout": True}, "True"),
        ({"timeout": "10"}, "'10'"),
        ({"liveness_timeout": 0}, "0"),
        ({"liveness_timeout": -1.0}, "-1.0"),
        ({"checksum": 1}, "1"),
        ({"secret": 1234}, "a int"),  # the type, never the value: it may be the secret
    ],
)
def test_sender_config_rejects_and_quotes(overrides: dict[str, object], quoted: str) -> None:
    with pytest.raises(ConfigError) as info:
        SenderConfig(**overrides)  # type: ignore[arg-type]
    field = next(iter(overrides))
    assert f"SenderConfig.{field}" in str(info.value)
    assert str(info.value).endswith(f"got {quoted}")
    assert isinstance(info.value, ValueError)  # ConfigError is also a ValueError


@pytest.mark.parametrize(("field", "value"), [("timeout", 0.0), ("idle_slice", -1),
                                              ("idle_slice", math.nan),
                                              ("learner_timeout", 0.0),
                                              ("reattach_timeout", -1.0),
                                              ("reattach_timeout", math.inf),
                                              ("reattach_timeout", True),
                                              ("accept_rewind", 1)])
def test_receiver_config_rejects_and_quotes(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"ReceiverConfig\.{field} .* got {value!r}"):
        ReceiverConfig(**{field: value})  # type: ignore[arg-type]


def test_defaults_are_valid_and_frozen() -> None:
    cfg = SenderConfig()
    assert (cfg.host, cfg.port, cfg.backend) == ("127.0.0.1", 0, "gloo")
    assert cfg.timeout > 0 and ReceiverConfig().idle_slice > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "quoted"),
    [({"port": 0}, "0"), ({"port": 65536}, "65536"), ({"name": "x/y"}, "'x/y'"),
     ({"backend": "ucc"}, "'ucc'"), ({"num_collectors": 0}, "0"),
     ({"num_collectors": 1.5}, "1.5")],
)
def test_connection_info_rejects_and_quotes(overrides: dict[str, object], quoted: str) -> None:
    with pytest.raises(ConfigError) as info:
        _info(**overrides)
    assert str(info.value).endswith(f"got {quoted}")


def test_connection_info_pickles_small_and_equal() -> None:
    info = _info(max_collectors=4)
    blob = pickle.dumps(info)
    assert pickle.loads(blob) == info
    assert len(blob) < 400  # a handful of fields, never a live object
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.port = 1  # type: ignore[misc]


def test_connection_info_max_collectors_defaults_and_validates() -> None:
    assert _info(num_collectors=3).max_collectors == 3
    assert _info(num_collectors=2, max_collectors=5).max_collectors == 5
    with pytest.raises(ConfigError, match=r"max_collectors .* got 1"):
        _info(num_collectors=2, max_collectors=1)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_collectors": 0}, "num_collectors .* got 0"),
    ({"num_collectors": "2"}, "num_collectors .* got '2'"),
    ({"num_collectors": 2, "max_collectors": 1}, "max_collectors .* got 1"),
    ({"num_collectors": 1, "timeout": -1.0}, "SenderConfig.timeout .* got -1.0"),
    ({"num_collectors": 1, "transport": "pigeon"},
     # other tests may have registered their own transports by now
     r"unknown transport 'pigeon'; registered: \[.*'distributed', .*'relay', .*'shm'"),
    ({"num_collectors": 1, "transport": "shm", "backend": "nccl"},
     "transport 'shm' needs backend 'gloo', got 'nccl'"),
    ({"num_collectors": 1, "transport": ""}, "SenderConfig.transport .* got ''"),
    ({"num_collectors": 1, "version": -1}, "version must be an int >= 0, got -1"),
])
def test_sender_arguments_validated_before_binding(kwargs: dict[str, object],
                                                   match: str) -> None:
    import models

    from weight_sync import WeightSender

    with pytest.raises(ConfigError, match=match):
        WeightSender(models.make_mlp(), **kwargs)  # type: ignore[arg-type]
