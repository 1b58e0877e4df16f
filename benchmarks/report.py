"""RESULTS.md: the goals with their measured ratios, then one table per model.

Every figure printed here was measured by the run that wrote the file; nothing is carried over.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone

import numpy as np

from bnfold.bench import bootstrap_speedup_ci

MIB = 2**20
MIN_INPUTS = 8  # fewer reference inputs than this cannot show a significant difference in error


def render(results, *, base_rss: float, environment: dict, command: str, minutes: float,
           profiles: dict) -> str:
    """The whole RESULTS.md as one string."""
    lines = [
        "# Benchmark results",
        "",
        (f"Regenerate with `{command}` (this run took {minutes:.1f} min). Generated "
         f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {environment['cpu']}, "
         f"{environment['cores']} cores, shared with other work: absolute times are noisy, ratios "
         "measured side by side in one run are what to read."),
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
    for result in results:
        if result.case.name in profiles and result.tools.get("bnfold") and result.tools["bnfold"].runs:
            lines += _profile(profiles[result.case.name], result)
    return "\n".join(lines) + "\n"


def _method() -> list[str]:
    return [
        "## How it is measured",
        "",
        ("- **fold s**: load + fold + save by the tool's Python API, timed inside a fresh process after "
         "its imports (import time apart); median of the repetitions on the large model, one run on the "
         "small ones. **floor s**: `onnx.load` + `onnx.save` of the same model, measured the same way "
         "in the same run; **x floor** = fold s / floor s. Every tool writes a new file (the previous "
         "output is deleted before each run)."),
        ("- **peak RSS**: the peak resident memory (VmHWM) of that process, imports included. "
         "**RSS/size** = (peak RSS - interpreter baseline) / model size."),
        ("- **max abs / rel err**: the result run by onnxruntime with optimizations disabled on the "
         "stored reference input, against the float64 PyTorch output; rel = max abs error / max "
         "|reference|. **mean max abs**: the mean of the max abs error over that input and up to 31 "
         "seeded ones whose float64 outputs come from evaluating the original graph in double precision "
         "(used only where that evaluation reproduces the PyTorch output): one input's max error is too "
         "noisy to rank two float32 models, so the error goals compare these means, with a 95% paired "
         "bootstrap over the inputs: a goal is missed where bnfold's error is significantly larger."),
        ("- **changed**: outputs moved from the original's by more than 10x the original's own error "
         "(+1e-5 of the range), or renamed/reshaped outputs."),
        ("- **create ms**, **disabled ms**, **all ms**: onnxruntime session creation (median of 2-3) and "
         "median latency at ORT_DISABLE_ALL / ORT_ENABLE_ALL, 1 intra-op thread; every variant and "
         "level timed round-robin in one loop, so drift hits all alike. On the large models the goals "
         "come from a longer second loop of the original and bnfold's result alone, at three levels."),
        "- Ratios with a 95% interval use a paired bootstrap over the rounds (bnfold.bench).",
        "",
    ]


# --------------------------------------------------------------------------------------------- goals
def _goals(results, base_rss: float) -> list[str]:
    """Speed and memory goals on each large model, error goals over every model."""
    rows = []
    large = [r for r in results if r.case.large]
    for result in large:
        rows += [(goal, f"`{result.case.name}`", measured, met)
                 for goal, measured, met in _large_goals(result, base_rss)]
    rows += [(goal, "all models", measured, met) for goal, measured, met in _error_goals(results)]
    lines = ["## Goals", ""]
    if not large:
        lines += ["(No large model in this run: the speed and memory goals need one.)", ""]
    lines += ["| goal | model | measured | met |", "|---|---|---|---|"]
    lines += [f"| {goal} | {model} | {measured} | {'yes' if met else '**no**'} |"
              for goal, model, measured, met in rows]
    return lines + [""]


def _large_goals(result, base_rss: float) -> list[tuple[str, str, bool]]:
    tools = result.tools
    rows = []
    bn, floor = tools.get("bnfold"), tools.get("load+save")
    if bn is None or bn.error or floor is None or floor.error:
        return [("bnfold folds the large model", bn.error if bn else "not run", False)]
    ratio = bn.median("fold_s") / floor.median("fold_s")
    rows.append(("fold time <= 1.5x load+save floor",
                 f"{bn.median('fold_s'):.3f} s / {floor.median('fold_s'):.3f} s = {ratio:.2f}x",
                 ratio <= 1.5))
    peers = {t: r.median("fold_s") for t, r in tools.items()
             if t not in ("bnfold", "load+save") and not r.error}
    if peers:
        fastest = min(peers, key=peers.get)
        rows.append(("fold time lower than every peer",
                     (f"bnfold {bn.median('fold_s'):.3f} s vs fastest peer {fastest} {peers[fastest]:.3f} s "
                      f"({bn.median('fold_s') / peers[fastest]:.2f}x)"), bn.median("fold_s") < peers[fastest]))
    size = result.case.path.stat().st_size / MIB
    over = (bn.median("peak_rss_mb") - base_rss) / size
    rows.append(("peak RSS <= 2x model size + interpreter baseline",
                 f"({bn.median('peak_rss_mb'):.0f} - {base_rss:.0f}) MiB / {size:.0f} MiB = {over:.2f}x",
                 over <= 2))
    if result.focus is not None:
        rows += _latency_goals(result.focus)
    return rows


def _latency_goals(timings) -> list[tuple[str, str, bool]]:
    lat = {k: np.asarray(v) for k, v in timings.latency.items()}
    fold_dis, fold_all = lat[("bnfold", "disabled")], lat[("bnfold", "all")]
    rows = []
    for level, goal in (("all", "folded at ORT disabled within 5% of original at ORT_ENABLE_ALL"),
                        ("basic", ("(context) folded at ORT disabled within 5% of original at "
                                   "ORT_ENABLE_BASIC, where onnxruntime fuses Conv+BN but not activations "
                                   "or layouts"))):
        orig = lat[("original", level)]
        slow = np.median(fold_dis) / np.median(orig)
        low, high = bootstrap_speedup_ci(fold_dis, orig)  # the interval of the same ratio
        rows.append((goal, (f"{np.median(fold_dis) * 1e3:.2f} ms / {np.median(orig) * 1e3:.2f} ms = "
                            f"{slow:.3f}x (95% CI {low:.3f}-{high:.3f})"), slow <= 1.05))
    orig_all = lat[("original", "all")]
    speedup = np.median(orig_all) / np.median(fold_all)
    low, high = bootstrap_speedup_ci(orig_all, fold_all)
    rows.append(("folded at ALL never slower than original at ALL",
                 (f"{np.median(fold_all) * 1e3:.2f} ms vs {np.median(orig_all) * 1e3:.2f} ms: speedup "
                  f"{speedup:.3f}x (95% CI {low:.3f}-{high:.3f})"), high >= 1))
    for level in ("all", "disabled"):
        orig = timings.median_ms(("original", level), "creation")
        fold = timings.median_ms(("bnfold", level), "creation")
        rows.append((f"session creation faster ({level})",
                     f"{fold:.0f} ms vs original {orig:.0f} ms ({orig / fold:.2f}x)", fold < orig))
    return rows


def _error_goals(results) -> list[tuple[str, str, bool]]:
    """bnfold's error against the original's and the best sound peer's, on every model, paired by input."""
    vs_orig, vs_peer = [], []
    for result in results:
        bn = result.tools.get("bnfold")
        if bn is None or bn.quality is None or not bn.quality.errors:
            continue
        vs_orig.append((result.case.name, bn.quality.errors, result.original.errors))
        peers = [r.quality for t, r in result.tools.items()
                 if t not in ("bnfold", "load+save") and r.quality is not None and r.changed is None]
        if peers:
            best = min(peers, key=lambda q: q.mean_max_abs)
            vs_peer.append((result.case.name, bn.quality.errors, best.errors))
    rows = [_error_row("folded error vs float64 no worse than the original's", vs_orig, "original"),
            _error_row("folded error no worse than any peer's", vs_peer, "best peer")]
    return [row for row in rows if row is not None]


def _error_row(goal: str, pairs: list[tuple[str, list[float], list[float]]], other: str):
    """Met unless bnfold's mean error is significantly larger (95% paired bootstrap over the inputs)."""
    if not pairs:
        return None
    ratios, worse, untested = [], [], []
    for name, ours, theirs in pairs:
        ratio = _ratio(float(np.mean(ours)), float(np.mean(theirs)))
        ratios.append((ratio, name))
        if len(ours) < MIN_INPUTS:
            untested.append(f"{name} {ratio:.2f}x ({len(ours)} input{'s' * (len(ours) > 1)})")
        elif mean_ratio_ci(ours, theirs)[0] > 1:
            worse.append(f"{name} {ratio:.2f}x (CI low {mean_ratio_ci(ours, theirs)[0]:.3f})")
    text = (f"bnfold / {other} mean max abs error: geometric mean "
            f"{math.exp(np.mean([math.log(max(r, 1e-300)) for r, _ in ratios])):.3f} over {len(ratios)} "
            f"model(s); significantly worse on {', '.join(worse) or 'none'}")
    if untested:
        text += f"; under {MIN_INPUTS} inputs, not testable: {', '.join(untested)}"
    return goal, text, not worse


def mean_ratio_ci(ours, theirs, *, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of mean(ours) / mean(theirs), resampling the inputs (paired)."""
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, a.size, size=(resamples, a.size))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = a[idx].mean(axis=1) / b[idx].mean(axis=1)
    low, high = np.nanquantile(ratios, [0.025, 0.975])
    return float(low), float(high)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else (1.0 if a == 0 else math.inf)


# ------------------------------------------------------------------------------------------- tables
def _summary(results) -> list[str]:
    """Per tool over every model: failures, changed functions, BNs left, fold time against the floor."""
    tools = list(results[0].tools) if results else []
    lines = ["## Summary over all models", "",
             ("| tool | models | crashed | changed function | BN left / BN in originals | "
              "fold time vs floor (geometric mean) |"), "|---|---|---|---|---|---|"]
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
             (f"{size:.2f} MiB, {result.original.bn_left} BatchNormalization, {result.original.nodes} "
              f"nodes; errors on {result.reference_note}."), "",
             ("| tool | BN left | nodes | fold s | floor s | x floor | import s | peak RSS MiB | RSS/size "
              "| max abs err | max rel err | mean max abs | create ms (all) | disabled ms | all ms "
              "| result |"),
             "|---|" + "---:|" * 14 + "---|"]
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
        _num(quality.mean_max_abs if quality else None, "{:.2e}"),
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


def _profile(profile: dict, result) -> list[str]:
    bn = result.tools["bnfold"]
    lines = [f"## Where bnfold's time and memory go: {result.case.name}", "",
             (f"Two more runs of `fold_file` in fresh processes (median fold time without instruments: "
              f"{bn.median('fold_s'):.3f} s, peak RSS {bn.median('peak_rss_mb'):.0f} MiB). First the "
              "phases, logged by a profile hook, with the resident memory sampled every 2 ms "
              "(tools.MemorySampler; the hook slows Python-heavy phases; an empty cell: no sample fell "
              "inside a phase that one C call filled):"), "",
             "| phase | time s | RSS first seen MiB | RSS max MiB | peak rise MiB |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| `{p['phase']}` | {p['time_s']:.3f} | {_num(p['rss_first_mb'], '{:.0f}')} | "
              f"{_num(p['rss_max_mb'], '{:.0f}')} | {p['peak_rise_mb']:.0f} |"
              for p in profile["phases"] if p["time_s"] >= 0.005 or p["peak_rise_mb"] >= 1]
    lines += ["", "cProfile (its overhead inflates Python-heavy code): bnfold's functions by cumulative time,",
              "", "| function | cumulative s | own s | calls |", "|---|---:|---:|---:|"]
    lines += [f"| `{_escape(n)}` | {cum:.3f} | {own:.3f} | {calls} |"
              for n, own, cum, calls in profile["cumulative"]]
    lines += ["", "and every function by own time:", "",
              "| function | own s | cumulative s | calls |", "|---|---:|---:|---:|"]
    lines += [f"| `{_escape(n)}` | {own:.3f} | {cum:.3f} | {calls} |"
              for n, own, cum, calls in profile["own"]]
    return lines + [""]
