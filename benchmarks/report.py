"""RESULTS.md: the goals with their measured ratios, then one table per model.

Every figure printed here was measured by the run that wrote the file; nothing is carried over.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone

import numpy as np

from bnfold.bench import bootstrap_speedup_ci

MIB = 2**20


def render(results, *, base_rss: float, environment: dict, command: str, minutes: float,
           profile) -> str:
    """The whole RESULTS.md as one string."""
    lines = [
        "# Benchmark results",
        "",
        f"Regenerate with `{command}` (this run took {minutes:.1f} min). Generated "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {environment['cpu']}, "
        f"{environment['cores']} cores, shared with other work: absolute times are noisy, ratios "
        "measured side by side in one run are what to read.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in environment.items() if k not in ("cpu", "cores")),
        "",
        f"Interpreter baseline (python + `import onnx`, peak RSS): {base_rss:.0f} MiB.",
        "",
        *_method(),
        *_goals(results, base_rss),
        *_summary(results),
    ]
    for result in results:
        lines += _case_table(result, base_rss)
    if profile:
        lines += _profile(profile, next(r for r in results if r.case.large))
    return "\n".join(lines) + "\n"


def _method() -> list[str]:
    return [
        "## How it is measured",
        "",
        "- **fold s**: load + fold + save by the tool's Python API, timed inside a fresh process after "
        "its imports (import time apart); median of the repetitions on the large model, one run on the "
        "small ones. **floor s**: `onnx.load` + `onnx.save` of the same model, measured the same way "
        "in the same run; **x floor** = fold s / floor s.",
        "- **peak RSS**: the peak resident memory (VmHWM) of that process, imports included. **RSS/size** = (peak RSS - "
        "interpreter baseline) / model size.",
        "- **max abs / rel err**: the result run by onnxruntime with optimizations disabled on the "
        "reference input, against the float64 PyTorch output; rel = max abs error / max |reference|.",
        "- **changed**: outputs moved from the original's by more than 10x the original's own error "
        "(+1e-5 of the range), or renamed/reshaped outputs.",
        "- **create ms**, **disabled ms**, **all ms**: onnxruntime session creation (median of 2-3) and "
        "median latency at ORT_DISABLE_ALL / ORT_ENABLE_ALL, 1 intra-op thread; every variant and "
        "level timed round-robin in one loop, so drift hits all alike.",
        "- Ratios with a 95% interval use a paired bootstrap over the rounds (bnfold.bench).",
        "",
    ]


# --------------------------------------------------------------------------------------------- goals
def _goals(results, base_rss: float) -> list[str]:
    rows = []
    large = next((r for r in results if r.case.large), None)
    if large is not None:
        rows += _large_goals(large, base_rss)
    rows += _error_goals(results)
    lines = ["## Goals", ""]
    if large is None:
        lines += ["(No large model in this run: the speed and memory goals need it.)", ""]
    else:
        lines += [f"Speed and memory on `{large.case.name}` ({large.case.path.stat().st_size / MIB:.1f} "
                  "MiB); errors over every model.", ""]
    lines += ["| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {goal} | {measured} | {'yes' if met else '**no**'} |" for goal, measured, met in rows]
    return lines + [""]


def _large_goals(result, base_rss: float) -> list[tuple[str, str, bool]]:
    tools, timings = result.tools, result.timings
    rows = []
    bn, floor = tools.get("bnfold"), tools.get("load+save")
    if bn is None or bn.error or floor is None or floor.error:
        return [("bnfold folds the large model", bn.error if bn else "not run", False)]
    ratio = bn.median("fold_s") / floor.median("fold_s")
    rows.append(("fold time <= 1.5x load+save floor",
                 f"{bn.median('fold_s'):.3f} s / {floor.median('fold_s'):.3f} s = {ratio:.2f}x", ratio <= 1.5))
    peers = {t: r.median("fold_s") for t, r in tools.items()
             if t not in ("bnfold", "load+save") and not r.error}
    if peers:
        fastest = min(peers, key=peers.get)
        rows.append(("fold time lower than every peer",
                     f"bnfold {bn.median('fold_s'):.3f} s vs fastest peer {fastest} {peers[fastest]:.3f} s "
                     f"({bn.median('fold_s') / peers[fastest]:.2f}x)", bn.median("fold_s") < peers[fastest]))
    size = result.case.path.stat().st_size / MIB
    over = (bn.median("peak_rss_mb") - base_rss) / size
    rows.append(("peak RSS <= 2x model size + interpreter baseline",
                 f"({bn.median('peak_rss_mb'):.0f} - {base_rss:.0f}) MiB / {size:.0f} MiB = {over:.2f}x",
                 over <= 2))
    if ("bnfold", "disabled") in timings.latency:
        rows += _latency_goals(timings)
    return rows


def _latency_goals(timings) -> list[tuple[str, str, bool]]:
    lat = {k: np.asarray(v) for k, v in timings.latency.items()}
    orig_all, fold_dis, fold_all = lat[("original", "all")], lat[("bnfold", "disabled")], lat[("bnfold", "all")]
    slow = np.median(fold_dis) / np.median(orig_all)
    low, high = bootstrap_speedup_ci(fold_dis, orig_all)  # interval of the same ratio, fold_dis / orig_all
    rows = [("folded at ORT disabled within 5% of original at ORT_ENABLE_ALL",
             f"{np.median(fold_dis) * 1e3:.2f} ms / {np.median(orig_all) * 1e3:.2f} ms = {slow:.3f}x "
             f"(95% CI {low:.3f}-{high:.3f})", slow <= 1.05)]
    speedup = np.median(orig_all) / np.median(fold_all)
    low, high = bootstrap_speedup_ci(orig_all, fold_all)
    rows.append(("folded at ALL never slower than original at ALL",
                 f"speedup {speedup:.3f}x (95% CI {low:.3f}-{high:.3f})", high >= 1))
    for level in ("all", "disabled"):
        orig = timings.median_ms(("original", level), "creation")
        fold = timings.median_ms(("bnfold", level), "creation")
        rows.append((f"session creation faster ({level})",
                     f"{fold:.0f} ms vs original {orig:.0f} ms ({orig / fold:.2f}x faster)", fold < orig))
    return rows


def _error_goals(results) -> list[tuple[str, str, bool]]:
    worst_orig = worst_peer = (0.0, "")
    for result in results:
        bn = result.tools.get("bnfold")
        if bn is None or bn.quality is None or bn.quality.max_abs is None:
            continue
        err = bn.quality.max_abs
        worst_orig = max(worst_orig, (_ratio(err, result.original.max_abs), result.case.name))
        peers = [r.quality.max_abs for t, r in result.tools.items()
                 if t not in ("bnfold", "load+save") and r.quality is not None and r.changed is None]
        if peers:
            worst_peer = max(worst_peer, (_ratio(err, min(peers)), result.case.name))
    if not worst_orig[1]:
        return []
    return [("folded error vs float64 no worse than original's",
             f"worst bnfold/original max abs error ratio {worst_orig[0]:.3f} ({worst_orig[1]})",
             worst_orig[0] <= 1),
            ("folded error no worse than any peer's",
             f"worst bnfold/best-peer ratio {worst_peer[0]:.3f} ({worst_peer[1] or 'no peer'})",
             worst_peer[0] <= 1)]


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else (1.0 if a == 0 else math.inf)


# ------------------------------------------------------------------------------------------- tables
def _summary(results) -> list[str]:
    """Per tool over every model: failures, changed functions, BNs left, fold time against the floor."""
    tools = list(results[0].tools) if results else []
    lines = ["## Summary over all models", "",
             "| tool | models | crashed | changed function | BN left / BN in originals | "
             "fold time vs floor (geometric mean) |", "|---|---|---|---|---|---|"]
    for tool in tools:
        crashed = changed = left = total = 0
        ratios = []
        for result in results:
            r, floor = result.tools[tool], result.tools.get("load+save")
            total += result.original.bn_left
            crashed += r.error is not None
            changed += r.changed is not None
            left += r.quality.bn_left if r.quality else result.original.bn_left
            if r.runs and floor is not None and floor.runs:
                ratios.append(r.median("fold_s") / floor.median("fold_s"))
        geo = f"{math.exp(np.mean(np.log(ratios))):.2f}x" if ratios else "n/a"
        lines.append(f"| {tool} | {len(results)} | {crashed} | {changed} | {left} / {total} | {geo} |")
    return lines + [""]


def _case_table(result, base_rss: float) -> list[str]:
    case, timings = result.case, result.timings
    size = case.path.stat().st_size / MIB
    floor = result.tools.get("load+save")
    floor_s = floor.median("fold_s") if floor is not None and floor.runs else None
    lines = [f"## {case.name}", "",
             f"{size:.2f} MiB, {result.original.bn_left} BatchNormalization, {result.original.nodes} nodes"
             + ("" if case.reference else "; no float64 reference, errors not measured") + ".", "",
             "| tool | BN left | nodes | fold s | floor s | x floor | import s | peak RSS MiB | RSS/size "
             "| max abs err | max rel err | create ms (all) | disabled ms | all ms | result |",
             "|---|" + "---:|" * 13 + "---|"]
    lines.append(_row("original", result.original, None, floor_s, timings, "original", base_rss, size))
    for tool, r in result.tools.items():
        key = "original" if tool == "load+save" else tool
        lines.append(_row(tool, r.quality, r, floor_s, timings, key, base_rss, size))
    return lines + [""]


def _row(label, quality, run, floor_s, timings, key, base_rss, size) -> str:
    fold_s = run.median("fold_s") if run is not None else None
    peak = run.median("peak_rss_mb") if run is not None else None
    cells = [
        label,
        _num(quality.bn_left if quality else None, "{}"),
        _num(quality.nodes if quality else None, "{}"),
        _num(fold_s, "{:.3f}"),
        _num(floor_s if run is not None else None, "{:.3f}"),
        _num(fold_s / floor_s if fold_s and floor_s else None, "{:.2f}"),
        _num(run.median("import_s") if run is not None else None, "{:.2f}"),
        _num(peak, "{:.0f}"),
        _num((peak - base_rss) / size if peak else None, "{:.1f}"),
        _num(quality.max_abs if quality else None, "{:.2e}"),
        _num(quality.max_rel if quality else None, "{:.2e}"),
        _num(timings.median_ms((key, "all"), "creation"), "{:.1f}"),
        _num(timings.median_ms((key, "disabled")), "{:.3f}"),
        _num(timings.median_ms((key, "all")), "{:.3f}"),
        _status(run),
    ]
    return "| " + " | ".join(cells) + " |"


def _status(run) -> str:
    if run is None:
        return "reference"
    if run.error:
        return f"**crashed**: {_escape(run.error)}"
    if run.changed:
        return f"**changed function**: {_escape(run.changed)}"
    return "ok"


def _num(value, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _profile(rows, result) -> list[str]:
    bn = result.tools["bnfold"]
    lines = ["## Where bnfold's time goes", "",
             f"cProfile of one `fold_file` on `{result.case.name}` (fold s without profiler: "
             f"{bn.median('fold_s'):.3f}); top functions by own time.", "",
             "| function | own s | cumulative s | calls |", "|---|---:|---:|---:|"]
    lines += [f"| `{_escape(name)}` | {own:.3f} | {cum:.3f} | {calls} |" for name, own, cum, calls in rows]
    return lines + [""]
