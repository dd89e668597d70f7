"""``weight-sync bench`` end to end on a tiny sweep, and ``benchmarks.report`` rendering.

Structure and correctness only: no assertion here depends on how fast anything is. The
tests that share the quick sweep are ``slow`` (the sweep takes ~40 s on 2 cores).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from weight_sync.cli import import_benchmarks

ROOT = Path(__file__).resolve().parents[1]
# torchrl's wheel ships a "benchmarks" folder too: import ours the way `weight-sync bench` does.
assert import_benchmarks(ROOT) is not None

from benchmarks import baselines, bench, report  # noqa: E402

THINGS = {"weight_sync/distributed", "weight_sync/shm", "torchrl", "raw_gloo", "memcpy"}
STATS = {"median_s", "p90_s", "mean_s", "min_s", "nbytes", "gbps_payload", "wall_s", "correct"}


# The full run's committed (or kept) outputs, which a quick run must leave alone.
FULL_OUTPUTS = [bench.BENCH_DIR / name for name in (
    "RESULTS.md", "latency_vs_size.png", "latency_vs_n.png", "results/latest.json")]


def _snapshot() -> dict[Path, bytes | None]:
    return {p: p.read_bytes() if p.exists() else None for p in FULL_OUTPUTS}


class QuickRun(NamedTuple):
    rc: int
    out: Path
    """Where the run's JSON, RESULTS.md and plots went (its QUICK_DIR)."""
    full_before: dict[Path, bytes | None]
    full_after: dict[Path, bytes | None]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    """One ``--quick`` sweep cut down to 100K params and 3 rounds (both kinds, N=1,2),
    with the default output directories (only ``QUICK_DIR`` moved to a temporary folder)."""
    out = tmp_path_factory.mktemp("bench") / "quick"
    before = _snapshot()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "QUICK_DIR", out)
        rc = bench.main(["--quick", "--sizes", "100000", "--rounds", "3", "--warmup", "1",
                         "--timeout", "60"])
    return QuickRun(rc, out, before, _snapshot())


@pytest.mark.slow
def test_quick_run_leaves_the_full_results(quick_run: QuickRun) -> None:
    changed = [p for p in FULL_OUTPUTS if quick_run.full_after[p] != quick_run.full_before[p]]
    assert changed == []
    assert {p.name for p in quick_run.out.iterdir()} >= {
        "latest.json", "RESULTS.md", report.SIZE_PLOT, report.N_PLOT}


def test_quick_defaults_keep_off_the_full_results() -> None:
    assert bench.default_dirs(quick=False) == (bench.BENCH_DIR / "results", bench.BENCH_DIR)
    results, report_dir = bench.default_dirs(quick=True)
    assert results == report_dir == bench.QUICK_DIR == bench.BENCH_DIR / "results" / "quick"
    assert report_dir / "RESULTS.md" not in FULL_OUTPUTS
    assert "results/" in (ROOT / ".gitignore").read_text().split()  # quick runs stay untracked


@pytest.mark.slow
def test_quick_sweep_json(quick_run: QuickRun) -> None:
    rc, out = quick_run.rc, quick_run.out
    assert rc == 0
    dated = sorted(out.glob("bench-*.json"))
    assert len(dated) == 1
    data: dict[str, Any] = json.loads((out / "latest.json").read_text())
    assert data == json.loads(dated[0].read_text())
    assert data["schema"] == 1 and data["all_correct"] is True
    assert data["errors"] == 0 and data["skipped"] == 0
    machine = data["machine"]
    for key in ("cpu_model", "cores", "memory_gib", "python", "date", "platform"):
        assert machine[key]
    assert {"torch", "torchrl", "tensordict"} <= set(machine["versions"])
    assert "set_num_threads(1)" in data["threads"]["policy"]
    assert "--quick" in data["command"] and data["argv"][0] == "--quick"
    configs = data["configs"]
    assert [(c["kind"], c["num_collectors"]) for c in configs] == [
        ("wide", 1), ("wide", 2), ("deep", 1), ("deep", 2)]
    orders = set()
    for cfg in configs:
        assert cfg["status"] == "ok"
        assert cfg["rounds"] == 3 and cfg["warmup"] == 1
        assert cfg["leaves"] == (8 if cfg["kind"] == "wide" else 298)
        assert cfg["nbytes"] == 4 * cfg["params"]
        assert set(cfg["results"]) == THINGS == set(cfg["order"])
        orders.add(tuple(cfg["order"]))
        for thing, res in cfg["results"].items():
            assert set(res) >= STATS, thing
            assert res["nbytes"] >= cfg["nbytes"]
            assert 0 < res["median_s"] <= res["p90_s"]
        assert cfg["results"]["weight_sync/distributed"]["async_median_s"] > 0
        assert cfg["correct"] == dict.fromkeys(THINGS, True)
        for transport in ("distributed", "shm"):
            ratios = cfg["ratios"][transport]
            assert set(ratios) == {"to_torchrl", "to_raw_gloo", "to_memcpy"}
            assert all(r > 0 for r in ratios.values())
    assert len(orders) == len(configs)  # the order of the compared things rotates


@pytest.mark.slow
def test_quick_sweep_report(quick_run: QuickRun) -> None:
    out = quick_run.out
    text = (out / "RESULTS.md").read_text()
    assert "## wide policy (8 leaves)" in text and "## deep policy (298 leaves)" in text
    assert "AMD" in text or "cores" in text
    assert "## How to rerun" in text and "weight-sync bench --quick" in text
    for name in (report.SIZE_PLOT, report.N_PLOT):
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_report_renders_from_json_with_skips(quick_run: QuickRun, tmp_path: Path) -> None:
    data = json.loads((quick_run.out / "latest.json").read_text())
    data["configs"][1]["skipped"] = {"torchrl": "--skip-torchrl wide:100000"}
    del data["configs"][1]["results"]["torchrl"]
    data["configs"].append({**data["configs"][0], "status": "skipped", "results": {},
                            "reason": "budget: test", "num_collectors": 4})
    src = tmp_path / "edited.json"
    src.write_text(json.dumps(data))
    assert report.main([str(src), "--out-dir", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "RESULTS.md").read_text()
    assert "skipped: budget: test" in text
    assert "torchrl --skip-torchrl wide:100000" in text
    assert (tmp_path / "r" / report.SIZE_PLOT).stat().st_size > 0
    assert (tmp_path / "r" / report.N_PLOT).stat().st_size > 0


def test_budget_skips_with_reason(tmp_path: Path) -> None:
    rc = bench.main(["--sizes", "100000", "--kinds", "wide", "--collectors", "1",
                     "--budget-s", "0", "--results-dir", str(tmp_path), "--no-report"])
    data = json.loads((tmp_path / "latest.json").read_text())
    assert rc == 0 and data["skipped"] == 1
    assert data["configs"][0]["status"] == "skipped"
    assert "budget" in data["configs"][0]["reason"]
    assert not (tmp_path / "RESULTS.md").exists()


def test_a_worker_that_exits_before_it_is_up_is_named() -> None:
    """The learner hears of a worker that died at start (no ``__main__`` guard, an import
    error) before its connect, not after that connect's whole timeout: a RuntimeError
    naming it and its exit code, where a wait for all would end in TimeoutError."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    alive = ctx.Event()
    procs = [ctx.Process(target=alive.wait, args=(60,), daemon=True),
             ctx.Process(target=sys.exit, args=(3,), daemon=True)]
    try:
        for p in procs:
            p.start()
        q.put(("up", 0, None))
        with pytest.raises(RuntimeError, match=r"\{1: 3\}"):
            baselines.wait_up(q, procs, timeout=60)
    finally:
        alive.set()
        baselines.reap(procs, 10)


def test_a_worker_that_fails_before_it_is_up_is_reported_with_its_error() -> None:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    q.put(("up", 1, None))
    q.put(("error", 0, "Traceback: boom"))
    with pytest.raises(RuntimeError, match="worker 0 failed before it was up:\nTraceback: boom"):
        baselines.wait_up(q, [ctx.Process(), ctx.Process()], timeout=5)


def test_round_timeline_sees_every_hand_off_of_every_round() -> None:
    """``benchmarks.round_timeline`` finds each stage's stamps in every timed round (the
    calls it wraps still exist and are passed in this order); values are not checked."""
    from benchmarks import round_timeline

    out = round_timeline.measure_timeline(100_000, "deep", rounds=4, warmup=1, timeout=60)
    assert out["stage_counts"] == {stage: 4 for stage, _, _ in round_timeline.STAGES}
    assert all(ms is not None and ms >= 0 for ms in out["stages_ms"].values())
    assert out["round_ms"] >= out["async_ms"] > 0
