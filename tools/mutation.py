"""Mutation score per module from a finished ``mutmut run`` (see docs/mutation.md).

Reads mutmut's per-file results (``mutants/**/*.py.meta``) and the committed lists of equivalent
mutants (``tests/mutation/equivalent*.txt``: ``<mutant name>  <reason>`` per line, ``#`` comments), and
prints killed, survived, equivalent, timeout and other per module, with
``score = killed / (total - equivalent)``. Exits 1 when a non-equivalent mutant survives unexplained and
the total score is under ``--min-score``, or when an equivalent entry is stale (the mutant no longer
exists in a module that has results, or a test now kills it: then it was not equivalent).

    mutmut run --max-children 2 && python tools/mutation.py
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT = ROOT / "tests" / "mutation"  # equivalent*.txt

# mutmut 3's exit-code meanings (mutmut.stats.status_by_exit_code), without importing mutmut.
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
          36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout",
          37: "caught by type check", -11: "segfault", -9: "segfault", None: "not checked"}


def load_equivalent(folder: Path = EQUIVALENT) -> dict[str, str]:
    """Mutant name -> reason, from the committed lists."""
    entries = {}
    for path in sorted(folder.glob("equivalent*.txt")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, _, reason = line.partition(" ")
            if not reason.strip():
                raise SystemExit(f"{path}:{number}: {name} has no reason")
            entries[name] = reason.strip()
    return entries


def dotted(module: str) -> str:
    """bnfold/passes/__init__.py -> bnfold.passes; bnfold/math.py -> bnfold.math."""
    return module.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def module_of(mutant: str) -> str:
    """The dotted module of a mutant name (bnfold.rules.base.x_fn__mutmut_3 -> bnfold.rules.base)."""
    match = re.match(r"^(.*?)\.x[_ǁ]", mutant)
    return match.group(1) if match else mutant


def load_results(mutants: Path) -> dict[str, dict[str, str]]:
    """Module path (bnfold/math.py) -> {mutant name: status}."""
    results = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        data = json.loads(meta.read_text())
        module = str(meta.relative_to(mutants)).removesuffix(".meta")
        results[module] = {name: STATUS.get(code, "suspicious") for name, code in data["exit_code_by_key"].items()}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=Path, default=ROOT / "mutants", help="mutmut's working folder")
    parser.add_argument("--min-score", type=float, default=0.90)
    parser.add_argument("--list", action="store_true", help="list every unexplained survivor")
    args = parser.parse_args(argv)
    results = load_results(args.mutants)
    if not results:
        print(f"no mutmut results under {args.mutants}: run `mutmut run` first", file=sys.stderr)
        return 2
    equivalent = load_equivalent()
    columns = ("killed", "survived", "equivalent", "timeout", "other")
    totals: Counter = Counter()
    unexplained, stale = [], []
    seen = set()
    rows = []
    for module, statuses in results.items():
        counts: Counter = Counter()
        for name, status in statuses.items():
            seen.add(name)
            if name in equivalent:
                counts["equivalent"] += 1
                if status in ("killed", "timeout"):
                    stale.append(f"{name}: listed as equivalent but {status}")
            elif status in ("killed", "survived", "timeout"):
                counts[status] += 1
            else:
                counts["other"] += 1
            if status == "survived" and name not in equivalent:
                unexplained.append(name)
        counts["total"] = len(statuses)
        totals.update(counts)
        if statuses:
            rows.append((module, counts))
    run = {dotted(module) for module in results}
    stale += [f"{name}: listed as equivalent but no such mutant" for name in equivalent
              if name not in seen and module_of(name) in run]
    rows.append(("TOTAL", totals))
    print(f"{'module':32} {'total':>6} " + " ".join(f"{c:>10}" for c in columns) + f" {'score':>7}")
    for module, counts in rows:
        denominator = counts["total"] - counts["equivalent"]
        score = counts["killed"] / denominator if denominator else 1.0
        print(f"{module:32} {counts['total']:>6} " + " ".join(f"{counts[c]:>10}" for c in columns)
              + f" {score:>7.1%}")
    total_score = totals["killed"] / max(1, totals["total"] - totals["equivalent"])
    if unexplained:
        print(f"\n{len(unexplained)} surviving mutant(s) neither killed nor listed in "
              f"{EQUIVALENT.relative_to(ROOT)}/equivalent*.txt"
              + ("" if args.list else " (--list names them; `mutmut show NAME` shows one)"))
        if args.list:
            for name in unexplained:
                print(f"  {name}")
    for line in stale:
        print(f"stale: {line}")
    return 1 if stale or total_score < args.min_score else 0


if __name__ == "__main__":
    sys.exit(main())
