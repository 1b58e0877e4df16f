"""The folding tools compared by the benchmark, and the child process that times one of them.

Each tool is a function that does its imports and returns `fold(src, dst)`: load the model from `src`,
fold BatchNormalization the tool's own way, save to `dst`. The imports happen before the clock starts,
so the fold time is load + fold + save only; their cost shows in the separate import time.

Run as a script, this file is the child process `run.py` starts once per (tool, model, repetition):

    python benchmarks/tools.py TOOL SRC DST [--profile FILE.prof]

It prints one JSON line: import and fold seconds, and the peak resident memory after the imports and
at the end. A fresh process per measurement makes the peak memory the tool's own and puts
every tool on the same cold start. On failure it prints {"error": "..."} and exits with status 1.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Callable

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


def onnxruntime() -> Fold:
    """onnxruntime's C++ optimizer at the basic level (which fuses Conv+BN), saved offline."""
    import onnxruntime as ort

    def fold(src: str, dst: str) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
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
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS: bytes; elsewhere: KiB
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def measure(tool: str, src: str, dst: str, profile: str | None = None) -> dict:
    """Import the tool, then time one load + fold + save; memory figures are peaks so far."""
    start = time.perf_counter()
    fold = TOOLS[tool]()
    imported = time.perf_counter()
    rss_imports = peak_rss_mb()
    if profile:
        import cProfile
        profiler = cProfile.Profile()
        profiler.runcall(fold, src, dst)
        profiler.dump_stats(profile)
    else:
        fold(src, dst)
    done = time.perf_counter()
    return {"import_s": imported - start, "fold_s": done - imported,
            "rss_after_imports_mb": rss_imports, "peak_rss_mb": peak_rss_mb()}


def baseline_rss() -> dict:
    """The bare interpreter with onnx imported: the memory every Python tool starts from."""
    import onnx  # noqa: F401
    return {"peak_rss_mb": peak_rss_mb()}


def main(argv: list[str]) -> int:
    if argv == ["--baseline"]:
        print(json.dumps(baseline_rss()))
        return 0
    profile = None
    if len(argv) == 5 and argv[3] == "--profile":
        profile = argv.pop(4)
        argv.pop(3)
    if len(argv) != 3 or argv[0] not in TOOLS:
        print(json.dumps({"error": f"usage: tools.py {{{','.join(TOOLS)}}} SRC DST [--profile FILE]"}))
        return 2
    try:
        result = measure(*argv, profile=profile)
    except Exception as exc:  # any failure of a peer tool is a result to report, not a crash of ours
        message = " ".join(str(exc).split())[:300] or type(exc).__name__
        print(json.dumps({"error": f"{type(exc).__name__}: {message}"}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
