"""The `bnfold` command line: one small function per subcommand over the library.

Exit codes: 0 success, 1 a check failed, 2 bad usage or bad input, 3 internal error (a bug); 130 and
143 interrupted by SIGINT and SIGTERM, 141 stdout closed early (as unix tools that these signals end).
Tables go to stdout; with --json exactly one JSON document goes to stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from contextlib import contextmanager

from .cli_options import (add_bench_arguments, add_pass_arguments, add_verify_arguments, bench_options_from_args,
                          given_flags, shape_defaults_hint, verify_options_from_args, with_flag)
from .errors import EXIT_INTERNAL, EXIT_OK, BnfoldError, Terminated
from .foldcmd import interrupts_raise
from .inputs import parse_dims

EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, as a shell reports a process that SIGINT ended
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader of stdout went away (`bnfold ... | head`)
BENCH_PREFIX = "bench-"  # fold --bench takes bench's flags as --bench-runs, --bench-level, ...


def _print_notes(notes) -> None:
    for note in notes:
        print(f"bnfold: note: {shape_defaults_hint(note)}", file=sys.stderr)


def _assumption_notes(reports) -> list[str]:
    """One note per BatchNormalization that --assume-inference rewrote: the model computes something
    else than it did, and the user must know where."""
    from .reasons import INFERENCE_ASSUMED
    return [f"{report.model}: BatchNormalization {_where(d)!r} ran in training mode; rewritten to use its "
            "running statistics (--assume-inference)"
            for report in reports for result in report.passes for d in result.decisions
            if d.reason == INFERENCE_ASSUMED]


def _where(decision) -> str:
    return f"{decision.graph}/{decision.node}" if decision.graph else decision.node


# ---------------------------------------------------------------------------------------------- fold
def _add_fold_parser(sub) -> None:
    p = sub.add_parser("fold", help="fold BatchNormalization nodes into neighbouring linear ops",
                       description="Fold every BatchNormalization that can be folded exactly into its "
                                   "neighbouring Conv, ConvTranspose, Gemm or MatMul; leave the others "
                                   "with a reason. The input file is never modified (unless --in-place).")
    p.add_argument("models", nargs="+", metavar="INPUT",
                   help="ONNX model file(s), or folder(s): every *.onnx below a folder")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-o", "--output", metavar="OUT", help="output file (one INPUT file only)")
    where.add_argument("--out-dir", metavar="DIR",
                       help="write each folded model under DIR: an INPUT file as DIR/its name, a folder's "
                            "models at their paths relative to it (subfolders are created)")
    where.add_argument("--in-place", action="store_true", help="replace each INPUT atomically")
    p.add_argument("--dry-run", action="store_true", help="report what would be folded, write nothing")
    p.add_argument("--report", metavar="FILE.json", help="write the fold report(s) as JSON")
    p.add_argument("--json", action="store_true", help="print the report(s) as one JSON document")
    p.add_argument("--exclude-node", action="append", default=[], metavar="NAME",
                   help="leave this BatchNormalization node as it is (repeatable; the name must exist "
                        "in at least one INPUT)")
    p.add_argument("--external-data", action="store_true",
                   help="store weights in OUT.data next to the output (automatic above 2 GB and for an "
                        "INPUT with external data)")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="fold N models in parallel processes")
    add_pass_arguments(p)
    checks = p.add_argument_group("verification (the flags of `bnfold verify`; they need --verify)")
    checks.add_argument("--verify", action="store_true",
                        help="compare the folded model with the original in onnxruntime before writing; "
                             "on a mismatch write nothing and exit 1")
    speed = p.add_argument_group("speed (the flags of `bnfold bench`, prefixed with --bench-; they need --bench)")
    speed.add_argument("--bench", action="store_true",
                       help="after writing, measure original vs folded in onnxruntime (bnfold bench)")
    p.set_defaults(func=cmd_fold, verify_flags=add_verify_arguments(checks),
                   bench_flags=add_bench_arguments(speed, prefix=BENCH_PREFIX))


def cmd_fold(args) -> int:
    several = _check_fold_usage(args)
    bench = _bench_options(args, several) if args.bench else None
    jobs = _fold_jobs(args)
    if not args.json:
        _import_tables()
    outcomes, seconds = _fold_all(args, jobs, several)
    _print_notes(_assumption_notes(o.report for o in outcomes if o.report is not None))
    _print_notes(dict.fromkeys(note for o in outcomes if o.report is not None
                               for note in getattr(o.report.verification, "notes", ())))
    _print_notes(_unchanged_notes(outcomes))
    if bench is not None:
        _bench_folded(bench, [o for o in outcomes if o.error is None])
    if several:
        _emit_many(args, outcomes, seconds)
    elif outcomes[0].report is not None:
        _emit_one(args, outcomes[0].report)
    for outcome in outcomes:
        if outcome.error is not None:
            print(f"bnfold: error: {with_flag(outcome.error).one_line()}", file=sys.stderr)
    return max(o.exit_code for o in outcomes)


def _unchanged_notes(outcomes) -> list[str]:
    """One note per model folded in place that was left as it was (nothing to change)."""
    from .fold import left_as_it_is
    return [f"{o.job.source}: nothing to change; the file was left as it was" for o in outcomes
            if o.error is None and o.job.target is not None
            and left_as_it_is(o.report, o.job.source, o.job.target, o.job.external_data)]


def _fold_jobs(args) -> list:
    """One FoldJob per model, after every check that can refuse the whole command."""
    from .foldcmd import FoldJob, check_targets, exclusions_per_model, find_models
    verify = verify_options_from_args(args) if args.verify else None
    found = find_models(args.models, skip=args.out_dir)
    shares = exclusions_per_model([source for source, _ in found], args.exclude_node)
    jobs = [FoldJob(source, _fold_target(args, source, place), shares[source], args.dry_run,
                    args.external_data, verify, args.assume_inference, args.lower_standalone,
                    not args.no_reparameterize)
            for source, place in found]
    check_targets(jobs, args.in_place)
    return jobs


def _fold_all(args, jobs, several: bool):
    """Fold every job; return the outcomes and the wall time. The subfolders of --out-dir made for
    the outputs are removed again if they stay empty (failed models, an interrupt). A bug while
    folding one of several models is that model's outcome; with one model, it is reported as every
    bug of every command is."""
    import time

    from .foldcmd import make_folders, remove_empty_folders, run_fold_jobs
    created = make_folders(jobs) if args.out_dir and not args.dry_run else []
    try:
        start = time.perf_counter()
        with _progress(len(jobs), several and sys.stderr.isatty()) as on_done:
            outcomes = run_fold_jobs(jobs, args.jobs, on_done=on_done, raise_bugs=args.debug or not several)
        return outcomes, time.perf_counter() - start
    finally:
        remove_empty_folders(created)


def _check_fold_usage(args) -> bool:
    """Refuse flags that cannot work together, before anything is read; return whether the command
    folds several models (several INPUTs or a folder: one table, one JSON document for all)."""
    for parent, given, flags in (("--verify", args.verify, args.verify_flags),
                                 ("--bench", args.bench, args.bench_flags)):
        orphans = given_flags(args, flags)
        if orphans and not given:
            raise BnfoldError(f"{orphans[0]} applies only with {parent}",
                              note=f"add {parent}, or drop {', '.join(orphans)}")
    if args.bench and args.dry_run:
        raise BnfoldError("--bench measures the written model", note="drop --dry-run")
    if args.jobs < 1:
        raise BnfoldError(f"must be at least 1, not {args.jobs}", option="jobs")
    from .passes.lower_standalone import check_lowering
    check_lowering(args.lower_standalone)
    several = len(args.models) > 1 or os.path.isdir(args.models[0])
    if args.dry_run:
        return several
    if args.output and os.path.isdir(args.models[0]):
        raise BnfoldError(f"{args.models[0]}: is a directory, and -o writes one model",
                          note="use --out-dir DIR to fold the models below it")
    if args.output and several:
        raise BnfoldError("-o takes one INPUT file", note="use --out-dir DIR for several inputs or a folder")
    if args.out_dir and not os.path.isdir(args.out_dir):
        raise BnfoldError(f"{args.out_dir}: output folder does not exist")
    if not (args.output or args.out_dir or args.in_place):
        raise BnfoldError("no output given", note="use -o OUT, --out-dir DIR, --in-place or --dry-run")
    return several


def _fold_target(args, source: str, place: str) -> str | None:
    """Where a folded model goes (bnfold.foldcmd.check_targets then refuses collisions)."""
    if args.dry_run:
        return None
    if args.in_place:
        return source
    return args.output or os.path.join(args.out_dir, place)


def _bench_options(args, several: bool):
    """`fold --bench`'s options, checked before anything is folded."""
    from .bench import require_matplotlib
    try:
        options = bench_options_from_args(args, prefix=BENCH_PREFIX)
        if options.plot and several:
            raise BnfoldError("draws the latencies of one model", note="give one INPUT file", option="plot")
        if options.plot:
            require_matplotlib()
    except BnfoldError as error:
        raise with_flag(error, prefix=BENCH_PREFIX) from error
    return options


def _bench_folded(options, outcomes) -> None:
    """`fold --bench`: measure each written model against its input; the result joins the report."""
    from .bench import bench_models, write_plot
    for outcome in outcomes:
        try:
            outcome.report.bench = bench_models(outcome.job.source, outcome.job.target, options)
            if options.plot:
                write_plot(outcome.report.bench, options.plot)
        except BnfoldError as error:
            raise with_flag(error, prefix=BENCH_PREFIX) from error


@contextmanager
def _progress(total: int, show: bool):
    """A progress bar on stderr while models are folded (yields the callback each outcome goes to).
    Refreshed by that callback only: no thread runs while worker processes are forked."""
    if not show:
        yield lambda outcome: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    with Progress(TextColumn("folding"), BarColumn(bar_width=30), MofNCompleteColumn(),
                  TextColumn("{task.description}"), console=Console(stderr=True), auto_refresh=False,
                  transient=True) as progress:
        task = progress.add_task("", total=total)
        progress.refresh()
        yield lambda outcome: progress.update(task, advance=1, refresh=True,
                                              description=os.path.basename(outcome.job.source))


def _write_report(args, document) -> None:
    import json
    if args.report:
        from .io import write_text_atomic
        write_text_atomic(args.report, json.dumps(document, indent=2, allow_nan=False) + "\n")


def _emit_one(args, report) -> None:
    """One INPUT file: its report, as it always was."""
    import json
    _write_report(args, report.to_dict())
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, allow_nan=False))
        return
    from .report import summary_table
    console = _console()
    verb = "would fold" if args.dry_run else "folded"
    console.print(f"{report.model}: {verb} {report.folded} of {report.total} BatchNormalization",
                  highlight=False, soft_wrap=True)
    console.print(summary_table(report))
    _print_checks(report)


def _emit_many(args, outcomes, seconds: float) -> None:
    """Several models: one table (or one JSON document), then the verify reports that failed and the
    bench tables."""
    import json

    from .foldcmd import models_document
    from .report import models_table
    document = models_document(outcomes, seconds, args.jobs)
    _write_report(args, document)
    if args.json:
        print(json.dumps(document, indent=2, allow_nan=False))
        return
    console = _console()
    console.print(models_table(document["models"]))
    summary = document["summary"]
    verb = "would fold" if args.dry_run else "folded"
    console.print(f"{summary['models']} models, {summary['failed']} failed: {verb} {summary['folded']} of "
                  f"{summary['batchnorm_total']} BatchNormalization in {summary['seconds']:.2f} s "
                  f"(--jobs {args.jobs})", highlight=False, soft_wrap=True)
    for outcome in outcomes:
        report = outcome.report
        if report is not None and (report.bench is not None or (report.verification is not None
                                                                and not report.verification)):
            console.print(f"{report.model}:", highlight=False, soft_wrap=True)
            _print_checks(report)


def _print_checks(report) -> None:
    if report.verification is not None:
        from .verify_render import print_report
        print_report(report.verification, file=sys.stdout)
    if report.bench is not None:
        from .bench import render_table
        render_table(report.bench, file=sys.stdout)


# ------------------------------------------------------------------------------------------- inspect
def _add_inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="show each BatchNormalization and what fold would do with it",
                       description="List every BatchNormalization node, its neighbour, and the decision "
                                   "fold would make with its reason, then what every pass of the pipeline "
                                   "would do. Writes nothing.")
    p.add_argument("input", metavar="INPUT")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--exclude-node", action="append", default=[], metavar="NAME")
    add_pass_arguments(p)
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
    import json
    from .fold import fold_file
    from .report import decisions_table, passes_table, summary_table
    report = fold_file(args.input, None, exclude_nodes=args.exclude_node, assume_inference=args.assume_inference,
                       reparameterize=not args.no_reparameterize,
                       lower_standalone=args.lower_standalone, dry_run=True)
    _print_notes(_assumption_notes([report]))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, allow_nan=False))
        return EXIT_OK
    console = _console()
    console.print(f"{args.input}: {report.total} BatchNormalization, {report.folded} foldable",
                  highlight=False, soft_wrap=True)
    console.print(decisions_table(report))
    console.print(passes_table(report))
    console.print(summary_table(report))
    return EXIT_OK


def _import_tables() -> None:
    """Import the table renderer before folding, not after: once a large fold has written gigabytes,
    reading its modules waits behind their writeback (3 s of a 13 s fold of a 3 GB model)."""
    import rich.console  # noqa: F401
    import rich.table  # noqa: F401


def _console():
    from rich.console import Console
    return Console(width=None if sys.stdout.isatty() else 160, soft_wrap=False)


# --------------------------------------------------------------------------------------------- check
def _add_check_parser(sub) -> None:
    p = sub.add_parser("check", help="fail while a model has a BatchNormalization that fold would change (CI, "
                                     "pre-commit)",
                       description="Run the fold pipeline over each model as inspect does, writing nothing; exit "
                                   "1 when bnfold fold would still fold a BatchNormalization (or lower one, with "
                                   "--lower-standalone mul-add), listing them; exit 2 when a model cannot be read; "
                                   "0 otherwise.")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="ONNX model file(s), or folder(s): every *.onnx below a folder")
    p.add_argument("--strict", action="store_true",
                   help="also fail on a BatchNormalization left for any reason but --exclude-node")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--exclude-node", action="append", default=[], metavar="NAME",
                   help="a BatchNormalization meant to stay (repeatable; the name must exist in at least one "
                        "MODEL)")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="check N models in parallel processes")
    add_pass_arguments(p)
    p.set_defaults(func=cmd_check)


def cmd_check(args) -> int:
    import json

    from .checkcmd import CheckOptions, check_models, print_check, summary_line
    from .passes.lower_standalone import check_lowering
    if args.jobs < 1:
        raise BnfoldError(f"must be at least 1, not {args.jobs}", option="jobs")
    options = CheckOptions(tuple(args.exclude_node), args.assume_inference,
                           check_lowering(args.lower_standalone), not args.no_reparameterize, args.strict)
    several = len(args.models) > 1 or os.path.isdir(args.models[0])
    if not args.json:
        _import_tables()
    run = check_models(args.models, options, jobs=args.jobs, raise_bugs=args.debug or not several)
    _print_notes(_assumption_notes(o.report for o in run.outcomes if o.report is not None))
    if args.json and (several or run.outcomes[0].report is not None):
        print(json.dumps(run.document(several), indent=2, allow_nan=False))
    elif not args.json:
        print_check(run, _console())
    sys.stdout.flush()  # the tables, then the errors, then the verdict: in this order in a CI log too
    for outcome in run.outcomes:
        if outcome.error is not None:
            print(f"bnfold: error: {with_flag(outcome.error).one_line()}", file=sys.stderr)
    if not args.json:
        print(summary_line(run))
    return run.exit_code


# -------------------------------------------------------------------------------------------- verify
def _add_verify_parser(sub) -> None:
    p = sub.add_parser(
        "verify", help="compare two models output by output with onnxruntime",
        usage="bnfold verify REFERENCE CANDIDATE [options]\n"
              "       bnfold verify --against-reference FILE.npz|DIR MODEL [options]",
        description="Run both models in onnxruntime (graph optimizations disabled) on the same inputs "
                    "and compare every output by name: pass when |a-b| <= atol + rtol*|a| everywhere. "
                    "Exit 0 pass, 1 mismatch, 2 bad input.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="REFERENCE CANDIDATE, or one MODEL "
                   "with --against-reference")
    add_verify_arguments(p)
    p.add_argument("--bisect", action="store_true",
                   help="on a mismatch, report the first tensor both models share that diverges")
    p.add_argument("--against-reference", metavar="FILE.npz|DIR",
                   help="compare MODEL with outputs saved by `bnfold export --reference`")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_verify)


def cmd_verify(args) -> int:
    import json

    from .errors import EXIT_CHECK_FAILED, EXIT_OK
    from .verify import verify_against_reference, verify_models
    from .verify_render import print_report

    wanted = 1 if args.against_reference else 2
    if len(args.models) != wanted:
        raise BnfoldError(f"verify takes {'one MODEL' if wanted == 1 else 'REFERENCE and CANDIDATE'}"
                          f"{' with --against-reference' if wanted == 1 else ''}, got "
                          f"{len(args.models)} model(s)")
    options = verify_options_from_args(args)
    if args.against_reference:
        report = verify_against_reference(args.against_reference, args.models[0], options)
    else:
        report = verify_models(args.models[0], args.models[1], options)
    _print_notes(report.notes)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, allow_nan=False))
    else:
        print_report(report)
    return EXIT_OK if report else EXIT_CHECK_FAILED


# --------------------------------------------------------------------------------------------- bench
def _add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure session creation and latency of two models, A/B interleaved",
                       description="Time session creation and inference of BASELINE and CANDIDATE with "
                                   "onnxruntime at each optimization level, in interleaved pairs, on the "
                                   "same seeded inputs; report medians, p10/p90, the speedup with a "
                                   "paired-bootstrap interval, and a verdict.")
    p.add_argument("baseline", metavar="BASELINE", help="the reference model, e.g. the original")
    p.add_argument("candidate", metavar="CANDIDATE", help="the model to compare, e.g. the folded one")
    add_bench_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from .bench import run_bench
    run_bench(args.baseline, args.candidate, bench_options_from_args(args), as_json=args.json)
    return EXIT_OK


# -------------------------------------------------------------------------------------------- export
def _add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="export a torch model to ONNX with every BatchNorm kept",
                       description="Export a sample architecture (bnfold.zoo) or your own factory "
                                   "to ONNX with torch's BatchNorm fusions off, then check that every "
                                   "BatchNorm called in forward is a BatchNormalization node. Needs torch: "
                                   "pip install 'bnfold[torch]'.")
    p.add_argument("model", metavar="NAME|module:callable",
                   help="a sample name (e.g. resnet_small) or an importable factory returning an nn.Module")
    p.add_argument("-o", "--output", metavar="OUT", required=True, help="the ONNX file to write")
    p.add_argument("--input-shape", action="append", metavar="SHAPE", default=None,
                   help="input shape like 1x3x224x224; repeat once per input (default: the sample's)")
    p.add_argument("--opset", type=int, metavar="N", help="ONNX opset (default 18)")
    p.add_argument("--dynamic-batch", action="store_true", help="make dimension 0 of inputs and outputs symbolic")
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                   help="torch exporter (default dynamo)")
    p.add_argument("--randomize-bn", action="store_true",
                   help="give every BatchNorm non-trivial statistics and affine parameters (seeded)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, BN statistics and inputs (default 0)")
    p.add_argument("--reference", metavar="FILE.npz",
                   help="also save the inputs and the float64 PyTorch eval-mode outputs")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from .export import export_model

    shapes = [parse_dims(text, option="input_shapes") for text in args.input_shape or ()] or None
    result = export_model(args.model, args.output, input_shapes=shapes, opset=args.opset,
                          dynamic_batch=args.dynamic_batch, exporter=args.exporter,
                          randomize_bn=args.randomize_bn, seed=args.seed, reference=args.reference)
    print(result.summary())
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bnfold", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_fold_parser, _add_inspect_parser, _add_check_parser, _add_verify_parser, _add_bench_parser,
                _add_export_parser):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; turn every error into a one-line message and an exit code. SIGINT and
    SIGTERM end it through every finally block (no temporary file is left): exit 130 and 143. A
    reader of stdout that went away ends it quietly: exit 141, as a unix tool that SIGPIPE ends."""
    try:
        with interrupts_raise():
            code = _run(argv)
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_BROKEN_PIPE


def _run(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version exit 0, usage errors exit 2
        return int(exc.code or 0)
    try:
        return args.func(args)
    except BrokenPipeError:
        raise
    except SystemExit as exc:  # rich's consoles end so when stdout is closed: the same as above
        if isinstance(exc.__context__, BrokenPipeError):
            raise exc.__context__ from None
        raise
    except BnfoldError as exc:
        if args.debug:
            raise
        print(f"bnfold: error: {with_flag(exc).one_line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("bnfold: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("bnfold: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except Exception as exc:  # a bug in bnfold: still one line unless --debug
        if args.debug:
            raise
        print(f"bnfold: internal error: {type(exc).__name__}: {exc}. Note: rerun with --debug "
              "for the traceback and report it.", file=sys.stderr)
        return EXIT_INTERNAL


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of what is still buffered does
    not fail a second time (see the Python docs on SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a file (captured): nothing will flush it
        pass


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("bnfold")
    except PackageNotFoundError:
        return "unknown"
