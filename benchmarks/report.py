"""Render ``benchmarks/results/RESULTS.md`` and the plots from a ``weight-sync bench`` JSON.

    python -m benchmarks.report                               # benchmarks/results/latest.json
    python -m benchmarks.report benchmarks/results/bench-20250101-120000.json --out-dir /tmp/r

Writes ``RESULTS.md`` (machine, date, how to rerun; per leaf kind a summary table of
every series side by side, the targets met or not, then one detailed table per
weight-sync series), ``latency_vs_size.png`` (median round latency against policy size
at N=1) and ``latency_vs_n.png`` (against N at 10M params, or the largest size with
several N), both with every weight-sync series, torchrl, Ray, raw gloo and memcpy on
log-log axes, one panel per leaf kind.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["display_path", "main", "render", "render_markdown", "render_plots"]

log = logging.getLogger(__name__)
BENCH_DIR = Path(__file__).resolve().parent
VS_N_SIZE = 10_000_000
SIZE_PLOT = "latency_vs_size.png"
N_PLOT = "latency_vs_n.png"
STYLE = {"torchrl": ("torchrl DistributedWeightSyncScheme", "tab:red", "s"),
         "ray": ("Ray object store (ray.put, actors ray.get)", "tab:purple", "D"),
         "raw_gloo": ("raw gloo, one flat tensor", "tab:gray", "^"),
         "memcpy": ("memcpy of the same bytes", "tab:green", "v")}
BASELINES = tuple(STYLE)
WS_COLORS = {"default": "tab:blue", "distributed": "tab:orange", "shm": "tab:olive",
             "relay": "tab:brown", "auto": "tab:cyan"}
TARGET_VS_TORCHRL = 3.0
"""The default's round is at least this many times faster than torchrl's, in every row."""
TARGET_ASYNC_VS_MEMCPY = 1.2
"""The default's ``send_weights_async`` costs at most this many memcpys of the policy..."""
TARGET_ASYNC_MIN_PARAMS = 10_000_000
"""... on policies this large or larger (on small ones a memcpy takes microseconds and
any fixed cost of a call exceeds it)."""


def _transports(data: dict[str, Any]) -> list[str]:
    names = data.get("settings", {}).get("transports")
    if names:
        return list(names)
    found = {k.split("/", 1)[1] for c in data["configs"] for k in c.get("results", {})
             if k.startswith("weight_sync/")}
    return sorted(found)


def _ms(res: dict[str, Any] | None, key: str = "median_s") -> str:
    if not res or key not in res:
        return "-"
    value = res[key] * 1e3
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _params(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def _cell_skip(cfg: dict[str, Any], thing: str) -> str | None:
    if thing in cfg.get("skipped", {}):
        return "skipped"
    if thing in cfg.get("errors", {}):
        return "error"
    return None


def _row(cfg: dict[str, Any], transport: str) -> str:
    res = cfg.get("results", {})
    head = [_params(cfg["params"]), str(cfg["num_collectors"]), f"{cfg['nbytes'] / 1e6:.3g}"]
    if cfg.get("status") == "skipped":
        return "| " + " | ".join(head + [f"skipped: {cfg.get('reason', '')}"] + [""] * 13) + " |"
    ours = res.get(f"weight_sync/{transport}")
    trl, raw, mem = res.get("torchrl"), res.get("raw_gloo"), res.get("memcpy")
    ray = res.get("ray")
    speedup = f"{trl['median_s'] / ours['median_s']:.2f}x" if ours and trl else "-"
    vs_ray = f"{ray['median_s'] / ours['median_s']:.2f}x" if ours and ray else "-"
    over_raw = f"{ours['median_s'] / raw['median_s']:.2f}x" if ours and raw else "-"
    flags = cfg.get("correct", {})

    def ok(thing: str) -> str:
        return "ok" if flags.get(thing) else ("n/a" if thing not in flags else "FAIL")

    cells = [
        *head,
        _ms(ours) if ours else (_cell_skip(cfg, f"weight_sync/{transport}") or "-"),
        _ms(ours, "p90_s"),
        f"{ours['gbps_payload']:.2f}" if ours else "-",
        _ms(trl) if trl else (_cell_skip(cfg, "torchrl") or "-"),
        _ms(trl, "p90_s"),
        _ms(ray) if ray else (_cell_skip(cfg, "ray") or "-"),
        _ms(raw), _ms(mem), speedup, vs_ray, over_raw,
        _ms(ours, "async_median_s"),
        f"{ok(f'weight_sync/{transport}')} / {ok('torchrl')}",
    ]
    return "| " + " | ".join(cells) + " |"


def _cell(cfg: dict[str, Any], thing: str) -> str:
    """``median (p90)`` ms of ``thing`` in ``cfg``, or why there is none."""
    res = cfg.get("results", {}).get(thing)
    if res is None:
        return _cell_skip(cfg, thing) or "-"
    return f"{_ms(res)} ({_ms(res, 'p90_s')})"


def _ratio(num: dict[str, Any] | None, den: dict[str, Any] | None,
           key: str = "median_s") -> float | None:
    if not num or not den or key not in num:
        return None
    return float(num[key] / den["median_s"])


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _summary(data: dict[str, Any], transports: list[str]) -> list[str]:
    """Per leaf kind, every series side by side: median (p90) ms."""
    things = [f"weight_sync/{t}" for t in transports] + list(BASELINES)
    names = {"torchrl": "torchrl", "ray": "Ray", "raw_gloo": "raw gloo", "memcpy": "memcpy"}
    cols = [names.get(t) or f"`{t.split('/', 1)[1]}`" for t in things]
    lines = ["## Summary: every series, median (p90) ms", ""]
    lead = f"weight_sync/{transports[0]}" if transports else None
    for kind in dict.fromkeys(c["kind"] for c in data["configs"]):
        cfgs = [c for c in data["configs"] if c["kind"] == kind]
        lines += [f"### {kind} policy ({cfgs[0].get('leaves', '?')} leaves)", "",
                  "| params | N | " + " | ".join(cols) + (
                      f" | `{transports[0]}` placed on | correct |" if lead else " |"),
                  "|" + "---|" * (len(cols) + 2 + (2 if lead else 0))]
        for c in cfgs:
            head = [_params(c["params"]), str(c["num_collectors"])]
            if c.get("status") == "skipped":
                lines.append("| " + " | ".join([*head, f"skipped: {c.get('reason', '')}"])
                             + " |")
                continue
            cells = head + [_cell(c, t) for t in things]
            if lead:
                placed = c.get("results", {}).get(lead, {}).get("placements") or {}
                cells.append(", ".join(f"{k} x{n}" for k, n in sorted(placed.items())) or "-")
                flags = c.get("correct", {})
                cells.append("ok" if flags and all(flags.values()) else
                             "FAIL: " + ", ".join(t for t, ok in flags.items() if not ok))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _targets(data: dict[str, Any]) -> list[str]:
    """The default series against the targets: torchrl, Ray, and memcpy for the async."""
    lines = ["## Targets: the default series", "",
             f"Met when the default's round is at least {TARGET_VS_TORCHRL:g}x faster than "
             f"torchrl's in every row, never slower than Ray's, and (policies of "
             f"{_params(TARGET_ASYNC_MIN_PARAMS)} parameters or more) its "
             f"`send_weights_async` costs at most {TARGET_ASYNC_VS_MEMCPY:g}x one memcpy of "
             "the policy. The memcpy it is held to is the one timed in the learner's "
             "process between its rounds (same processes running, same moment: "
             "\"in round\"); the standalone memcpy baseline, timed in a process of its "
             "own, is shown beside it.", "",
             "| policy | params | N | default ms | torchrl / default | Ray / default "
             "| default async ms | async / memcpy in round | async / memcpy alone | met |",
             "|" + "---|" * 10]
    misses = 0
    for c in data["configs"]:
        res = c.get("results", {})
        ours = res.get("weight_sync/default")
        if ours is None:
            continue
        vs_trl = _ratio(res.get("torchrl"), ours)
        vs_ray = _ratio(res.get("ray"), ours)
        alone_x = _ratio(ours, res.get("memcpy"), "async_median_s")
        in_round = ours.get("memcpy_in_round_median_s")
        in_round_x = ours["async_median_s"] / in_round if in_round else None
        async_x = alone_x if in_round_x is None else in_round_x
        checks = [vs_trl is None or vs_trl >= TARGET_VS_TORCHRL,
                  vs_ray is None or vs_ray >= 1.0,
                  async_x is None or c["params_target"] < TARGET_ASYNC_MIN_PARAMS
                  or async_x <= TARGET_ASYNC_VS_MEMCPY]
        misses += not all(checks)
        why = [name for name, ok in zip(("torchrl", "Ray", "async"), checks, strict=True)
               if not ok]
        lines.append(f"| {c['kind']} | {_params(c['params'])} | {c['num_collectors']} | "
                     f"{_ms(ours)} | {_x(vs_trl)} | {_x(vs_ray)} | "
                     f"{_ms(ours, 'async_median_s')} | {_x(in_round_x)} | {_x(alone_x)} | "
                     f"{'yes' if not why else 'no: ' + ', '.join(why)} |")
    lines += ["", f"Rows missing a target: {misses}.", ""]
    return lines


def render_markdown(data: dict[str, Any], json_path: str | None = None) -> str:
    """Return the text of ``RESULTS.md`` for a bench report."""
    m = data.get("machine", {})
    v = m.get("versions", {})
    s = data.get("settings", {})
    lines = [
        "# weight-sync benchmark results", "",
        f"Run {data.get('date', '?')} — generated by `python -m benchmarks.report"
        f"{' ' + json_path if json_path else ''}`; do not edit by hand.", "",
        f"- **Machine:** {m.get('cpu_model', '?')}, {m.get('cores', '?')} cores "
        f"({m.get('cores_usable', '?')} usable), {m.get('memory_gib', '?')} GiB, "
        f"{m.get('platform', '?')}",
        f"- **Software:** torch {v.get('torch_runtime') or v.get('torch')}, torchrl "
        f"{v.get('torchrl')}, tensordict {v.get('tensordict')}, ray {v.get('ray')}, "
        f"python {m.get('python')}",
        f"- **Default:** `default` is `WeightSender(policy, num_collectors=N)` with no "
        f"transport keyword (`SenderConfig.transport` = "
        f"`{data.get('default_transport', '?')}` in this run)",
        f"- **Load average:** start {m.get('loadavg_start')}, end {m.get('loadavg_end')} "
        "(other work on the machine makes timings swing)",
        f"- **Threads:** {data.get('threads', {}).get('policy', '?')}",
        f"- **Rounds:** {data.get('rounds_note', '?')}; timeout {s.get('timeout')} s per wait",
        f"- **Command:** `{data.get('command', '?')}` — total {data.get('total_wall_s', 0):.0f} s, "
        f"all correct: {data.get('all_correct')}, errors: {data.get('errors')}, "
        f"skipped configs: {data.get('skipped')}",
        "", "## How to rerun", "", "```",
        "weight-sync bench                      # full sweep, writes benchmarks/results/ "
        "and this file",
        "weight-sync bench --quick              # 100K and 1M params, N=1,2; writes "
        "benchmarks/results/quick/",
        "weight-sync bench --max-collectors 8   # adds N=8",
        "python -m benchmarks.report benchmarks/results/latest.json   # re-render only",
        "```", "",
        "## What is measured", "",
        "A **round** is the learner pushing new weights to all N collector processes "
        "and waiting for every acknowledgement, timed on the learner (median and p90 "
        "over the rounds, after warmup). *weight-sync*: `send_weights_async()` + "
        "`wait_ack()`; *async* is the learner's time inside `send_weights_async()`; "
        "`default` passes no transport keyword (what a user with no settings gets), the "
        "other weight-sync series force that transport. "
        "*torchrl*: `DistributedWeightSyncScheme(backend='gloo').send()` on the same "
        "policy and N. *Ray*: `ray.put(policy.state_dict())` once per version, then N "
        "Ray actors `ray.get` it and `load_state_dict` it into the same policy, the "
        "learner waiting for all (a local Ray started for that measurement only). "
        "*raw gloo*: one flat uint8 tensor of the same bytes sent to each "
        "collector plus a 1-element ack — the gloo wire's limit. *memcpy*: one in-process "
        "copy of the same bytes. The order of the series is rotated from one "
        "configuration to the next. *vs torchrl* = torchrl median / weight-sync median "
        "and *vs Ray* = Ray median / weight-sync median (above 1: weight-sync faster); "
        "*vs raw* = weight-sync median / raw gloo median. Correctness: every collector's "
        "weights bit-equal to the learner's after the last round (weight-sync / torchrl).",
        "", f"![latency vs size]({SIZE_PLOT})", "", f"![latency vs N]({N_PLOT})", "",
    ]
    transports = _transports(data)
    lines += _summary(data, transports)
    if "default" in transports:
        lines += _targets(data)
    header = ("| params | N | MB | weight-sync median ms | p90 ms | GB/s | torchrl median ms "
              "| p90 ms | Ray ms | raw gloo ms | memcpy ms | vs torchrl | vs Ray | vs raw "
              "| async ms | correct |")
    for transport in transports:
        for kind in dict.fromkeys(c["kind"] for c in data["configs"]):
            cfgs = [c for c in data["configs"] if c["kind"] == kind]
            leaves = cfgs[0].get("leaves", "?")
            lines += [f"## {kind} policy ({leaves} leaves), weight-sync `{transport}`",
                      "", header, "|" + "---|" * 16]
            lines += [_row(c, transport) for c in cfgs]
            notes = [f"{_params(c['params'])} N={c['num_collectors']}: {t} {why}"
                     for c in cfgs for t, why in c.get("skipped", {}).items()]
            notes += [f"{_params(c['params'])} N={c['num_collectors']}: {t} failed: {e}"
                      for c in cfgs for t, e in c.get("errors", {}).items()]
            if notes:
                lines += ["", "Skipped or failed: " + "; ".join(notes) + "."]
            lines.append("")
    return "\n".join(lines)


def _series(cfgs: list[dict[str, Any]], thing: str, x_key: str
            ) -> tuple[list[float], list[float], list[float]]:
    pts = sorted((c[x_key], c["results"][thing]["median_s"] * 1e3,
                  c["results"][thing]["p90_s"] * 1e3)
                 for c in cfgs if thing in c.get("results", {}))
    return [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]


def _panel(ax: Any, cfgs: list[dict[str, Any]], things: list[str], x_key: str) -> None:
    for thing in things:
        if thing.startswith("weight_sync/"):
            name = thing.split("/", 1)[1]
            label, color, marker = f"weight-sync ({name})", WS_COLORS.get(name, "tab:pink"), "o"
        else:
            label, color, marker = STYLE[thing]
        xs, med, p90 = _series(cfgs, thing, x_key)
        if not xs:
            continue
        if thing == "memcpy" and x_key == "num_collectors":
            ax.axhline(sum(med) / len(med), color=color, ls=":", label=label)
            continue
        err = [[0.0] * len(med), [max(0.0, b - a) for a, b in zip(med, p90, strict=True)]]
        ax.errorbar(xs, med, yerr=err, color=color, marker=marker, capsize=3, label=label,
                    ls="--" if thing == "raw_gloo" else "-")
    ax.set_xscale("log", base=2 if x_key == "num_collectors" else 10)
    if x_key == "num_collectors":
        ns = sorted({c["num_collectors"] for c in cfgs})
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_ylabel("round latency, ms (median, bar to p90)")


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def render_plots(data: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write ``latency_vs_size.png`` and ``latency_vs_n.png`` into ``out_dir``."""
    configs = [c for c in data["configs"] if c.get("results")]
    kinds = list(dict.fromkeys(c["kind"] for c in data["configs"]))
    things = [f"weight_sync/{t}" for t in _transports(data)] + list(BASELINES)
    written = []
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        cfgs = [c for c in configs if c["kind"] == kind and c["num_collectors"] == 1]
        _panel(ax, cfgs, things, "params")
        ax.set_xlabel("policy parameters (float32)")
        ax.set_title(f"{kind} policy, N=1")
    written.append(_save(fig, axes, out_dir / SIZE_PLOT))

    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        mine = [c for c in configs if c["kind"] == kind]
        sizes = sorted({c["params_target"] for c in mine
                        if sum(d["params_target"] == c["params_target"] for d in mine) > 1})
        size = VS_N_SIZE if VS_N_SIZE in sizes else max(
            [s for s in sizes if s <= VS_N_SIZE] or sizes or [0])
        cfgs = [c for c in mine if c["params_target"] == size]
        _panel(ax, cfgs, things, "num_collectors")
        ax.set_xlabel("collectors N")
        ax.set_title(f"{kind} policy, {_params(cfgs[0]['params']) if cfgs else '?'} params")
    written.append(_save(fig, axes, out_dir / N_PLOT))
    return written


def _save(fig: Any, axes: Any, path: Path) -> Path:
    _legend(axes[0][0])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def display_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies under it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def render(data: dict[str, Any], out_dir: Path = BENCH_DIR / "results",
           json_path: str | None = None) -> list[Path]:
    """Write ``RESULTS.md`` and the plots into ``out_dir``; return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "RESULTS.md"
    md.write_text(render_markdown(data, json_path))
    paths = [md, *render_plots(data, out_dir)]
    log.info("rendered %s", ", ".join(map(str, paths)))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", nargs="?", type=Path,
                        default=BENCH_DIR / "results" / "latest.json")
    parser.add_argument("--out-dir", type=Path, default=BENCH_DIR / "results",
                        help="where RESULTS.md and the PNGs go (default benchmarks/results/)")
    args = parser.parse_args(argv)
    data = json.loads(args.json.read_text())
    for path in render(data, args.out_dir, json_path=display_path(args.json)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
