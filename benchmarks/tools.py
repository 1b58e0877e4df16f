"""The folding tools compared by the benchmark, and the child process that times one of them.

Each tool is a function that does its imports and returns `fold(src, dst)`: load the model from `src`,
fold BatchNormalization the tool's own way, save to `dst`. The imports happen before the clock starts,
so the fold time is load + fold + save only; their cost shows in the separate import time.

Run as a script, this file is the child process `run.py` starts once per (tool, model, repetition):

    python benchmarks/tools.py TOOL SRC DST [--profile FILE.prof | --memory]
    python benchmarks/tools.py --baseline

It prints one JSON line: import and fold seconds, and the peak resident memory after the imports and
at the end. A fresh process per measurement makes the peak memory the tool's own and puts
every tool on the same cold start. On failure it prints {"error": "..."} and exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable

Fold = Callable[[str, str], None]


def load_save() -> Fold:
    """The floor: what any Python tool must pay to read and write the model with the onnx package."""
    import onnx

    def fold(src: str, dst: str) -> None:
        onnx.save(onnx.load(src), dst)
    return fold


def bnfold() -> Fold:
    from bnfold.fold import fold_file

    def fold(src: str, dst: str) -> None:
        fold_file(src, dst)
    return fold


def onnxoptimizer() -> Fold:
    import onnx
    import onnxoptimizer as optimizer

    def fold(src: str, dst: str) -> None:
        onnx.save(optimizer.optimize(onnx.load(src), ["fuse_bn_into_conv"]), dst)
    return fold


def onnxsim() -> Fold:
    import onnx
    import onnxsim as simplifier

    def fold(src: str, dst: str) -> None:
        model, ok = simplifier.simplify(onnx.load(src))
        if not ok:
            raise RuntimeError("onnxsim's own check of the simplified model failed")
        onnx.save(model, dst)
    return fold


def onnxslim() -> Fold:
    import onnx
    import onnxslim as slim

    def fold(src: str, dst: str) -> None:
        onnx.save(slim.slim(onnx.load(src)), dst)
    return fold


def onnxscript() -> Fold:
    """onnxscript's default optimizer, which includes its fuse-batchnorm rewrite rules."""
    import onnx_ir as ir
    from onnxscript import optimizer

    def fold(src: str, dst: str) -> None:
        model = ir.load(src)
        optimizer.optimize(model)
        ir.save(model, dst)
    return fold


def onnxruntime(level: str = "basic") -> Fold:
    """onnxruntime's C++ optimizer at `level` (basic fuses Conv+BN; all is what a session runs by
    default), saved offline."""
    import onnxruntime as ort
    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}

    def fold(src: str, dst: str) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = levels[level]
        options.optimized_model_filepath = dst
        ort.InferenceSession(src, options, providers=["CPUExecutionProvider"])
    return fold


# The floor first, then bnfold, then its peers: the order of the rows in RESULTS.md.
TOOLS: dict[str, Callable[[], Fold]] = {
    "load+save": load_save,
    "bnfold": bnfold,
    "onnxoptimizer": onnxoptimizer,
    "onnxsim": onnxsim,
    "onnxslim": onnxslim,
    "onnxscript": onnxscript,
    "onnxruntime": onnxruntime,
}
PACKAGES = {"load+save": "onnx", "bnfold": "bnfold", "onnxoptimizer": "onnxoptimizer",
            "onnxsim": "onnxsim", "onnxslim": "onnxslim", "onnxscript": "onnxscript",
            "onnxruntime": "onnxruntime"}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    Linux's VmHWM belongs to this program's own address space. ru_maxrss would not do: Linux carries it
    over from the parent across fork + exec, so a child of a big parent would report the parent's peak.
    """
    if sys.platform == "linux":
        return _proc_status("VmHWM")[0]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS: bytes; elsewhere: KiB
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _proc_status(*keys: str) -> list[float]:
    """Memory figures of /proc/self/status (Linux), in MiB, read at once."""
    with open("/proc/self/status") as status:
        found = {line.split(":")[0]: int(line.split()[1]) / 1024 for line in status
                 if line.split(":")[0] in keys}  # values in kB
    return [found[key] for key in keys]


def measure(tool: str, src: str, dst: str, *, profile: str | None = None, memory: bool = False) -> dict:
    """Import the tool, then time one load + fold + save; memory figures are peaks so far.

    `profile` runs the fold under cProfile and writes its stats there; `memory` samples the memory and
    the call stack while folding and adds the phases (see :class:`MemorySampler`).
    """
    start = time.perf_counter()
    fold = TOOLS[tool]()
    imported = time.perf_counter()
    rss_imports = peak_rss_mb()
    phases = None
    if profile:
        import cProfile
        profiler = cProfile.Profile()
        profiler.runcall(fold, src, dst)
        profiler.dump_stats(profile)
    elif memory:
        with MemorySampler() as sampler:
            fold(src, dst)
        phases = sampler.phases()
    else:
        fold(src, dst)
    done = time.perf_counter()
    result = {"import_s": imported - start, "fold_s": done - imported,
              "rss_after_imports_mb": rss_imports, "peak_rss_mb": peak_rss_mb()}
    if phases is not None:
        result["memory_phases"] = phases
    return result


class MemorySampler:
    """Which phase of the fold holds the memory (Linux): the main thread logs its phases, a thread samples.

    A phase is the chain of the DEPTH outermost Python calls below the tool's `fold` (e.g. `fold_file >
    open_model > _check_file`). A profile hook (sys.setprofile) in the main thread logs every change of
    phase with its time; it slows Python-heavy phases somewhat. A thread reads VmRSS and VmHWM every
    INTERVAL_S with one pread, a system call made without the GIL, so each figure carries the time it
    was read. The thread cannot run while a C call holds the GIL (parsing, the checker), so the rise of
    the peak between two samples is charged to the phase that filled most of the time between them.
    """

    INTERVAL_S = 0.002
    DEPTH = 3  # calls below `fold` that name a phase
    OUTSIDE = "(outside fold)"

    def __enter__(self):
        import threading
        self.fd = os.open("/proc/self/status", os.O_RDONLY)
        self.start = time.perf_counter()
        self.samples: list[tuple[float, float, float]] = []  # (time, VmRSS, VmHWM)
        self.changes: list[tuple[float, str]] = [(0.0, self.OUTSIDE)]  # (time, phase from then on)
        self.names: list[str] = []  # the calls below `fold`, down to DEPTH
        self.depth: int | None = None  # how deep below `fold` the main thread is; None: outside it
        self._sample()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        sys.setprofile(self._hook)
        return self

    def __exit__(self, *exc):
        sys.setprofile(None)
        self.stop.set()
        self.thread.join()
        self._sample()
        os.close(self.fd)

    def _loop(self) -> None:
        while not self.stop.is_set():
            self._sample()
            time.sleep(self.INTERVAL_S)

    def _sample(self) -> None:
        at = time.perf_counter() - self.start
        fields = dict(line.split(":", 1) for line in os.pread(self.fd, 8192, 0).decode().splitlines())
        rss, peak = (int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM"))
        self.samples.append((at, rss, peak))

    def _hook(self, frame, event, arg) -> None:
        if event == "call":
            if self.depth is None:
                if frame.f_code.co_name == "fold" and frame.f_code.co_filename == __file__:
                    self.depth = 0
                    self._changed()
                return
            self.depth += 1
            if self.depth <= self.DEPTH:
                self.names.append(frame.f_code.co_name)
                self._changed()
        elif event == "return" and self.depth is not None:
            if self.depth and self.depth <= self.DEPTH:
                self.names.pop()
            self.depth = self.depth - 1 if self.depth else None
            self._changed()

    def _changed(self) -> None:
        phase = self.OUTSIDE if self.depth is None else " > ".join(self.names) or "fold"
        if phase != self.changes[-1][1]:
            self.changes.append((time.perf_counter() - self.start, phase))

    def phases(self) -> list[dict]:
        """Per phase, in order of appearance: time spent in it, resident memory when first sampled
        and at most, and how much the process's peak rose while it was running."""
        end = self.samples[-1][0]
        spans = [(at, nxt, phase) for (at, phase), (nxt, _) in zip(self.changes, [*self.changes[1:], (end, "")])]
        result: dict[str, dict] = {}
        for at, nxt, phase in spans:
            entry = result.setdefault(phase, {"phase": phase, "time_s": 0.0, "rss_first_mb": None,
                                              "rss_max_mb": None, "peak_rise_mb": 0.0})
            entry["time_s"] += nxt - at
        for at, rss, _ in self.samples:
            entry = result[self._phase_at(spans, at)]
            entry["rss_first_mb"] = rss if entry["rss_first_mb"] is None else entry["rss_first_mb"]
            entry["rss_max_mb"] = max(rss, entry["rss_max_mb"] or 0.0)
        for (before, _, old_peak), (at, _, peak) in zip(self.samples, self.samples[1:]):
            if peak > old_peak:
                result[self._dominant(spans, before, at)]["peak_rise_mb"] += peak - old_peak
        return list(result.values())

    @staticmethod
    def _phase_at(spans, at: float) -> str:
        return next((phase for start, stop, phase in spans if start <= at < stop), spans[-1][2])

    @staticmethod
    def _dominant(spans, before: float, at: float) -> str:
        """The phase that ran longest between two samples."""
        overlap = {}
        for start, stop, phase in spans:
            overlap[phase] = overlap.get(phase, 0.0) + max(0.0, min(stop, at) - max(start, before))
        return max(overlap, key=overlap.get)


def baseline_rss() -> dict:
    """The bare interpreter with onnx imported: the memory every Python tool starts from."""
    import onnx  # noqa: F401
    return {"peak_rss_mb": peak_rss_mb()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="time one tool on one model in this fresh process")
    parser.add_argument("tool", nargs="?", choices=list(TOOLS))
    parser.add_argument("src", nargs="?")
    parser.add_argument("dst", nargs="?")
    parser.add_argument("--baseline", action="store_true", help="only the interpreter with onnx imported")
    parser.add_argument("--profile", metavar="FILE.prof", help="run the fold under cProfile")
    parser.add_argument("--memory", action="store_true", help="sample memory and call stack by phase")
    args = parser.parse_args(argv)
    if args.baseline:
        print(json.dumps(baseline_rss()))
        return 0
    if not args.dst:
        parser.error("TOOL SRC DST are required")
    try:
        result = measure(args.tool, args.src, args.dst, profile=args.profile, memory=args.memory)
    except Exception as exc:  # noqa: BLE001 - a peer's failure is a result to report, not a crash of ours
        message = " ".join(str(exc).split())[:300] or type(exc).__name__
        print(json.dumps({"error": f"{type(exc).__name__}: {message}"}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
