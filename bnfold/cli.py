"""The `bnfold` command line: one small function per subcommand over the library.

Exit codes: 0 success, 1 a check failed, 2 bad usage or bad input, 3 internal error (a bug).
Tables go to stdout; with --json exactly one JSON document goes to stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import sys

from .cli_options import (add_bench_arguments, add_verify_arguments, bench_options_from_args,
                          shape_defaults_hint, verify_options_from_args, with_flag)
from .errors import EXIT_OK, BnfoldError
from .inputs import parse_dims

EXIT_INTERNAL = 3
BENCH_PREFIX = "bench-"  # fold --bench takes bench's flags as --bench-runs, --bench-level, ...


def _print_notes(notes) -> None:
    for note in notes:
        print(f"bnfold: note: {shape_defaults_hint(note)}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- fold
def _add_fold_parser(sub) -> None:
    p = sub.add_parser("fold", help="fold BatchNormalization nodes into neighbouring linear ops",
                       description="Fold every BatchNormalization that can be folded exactly into its "
                                   "neighbouring Conv, ConvTranspose, Gemm or MatMul; leave the others "
                                   "with a reason. The input file is never modified (unless --in-place).")
    p.add_argument("models", nargs="+", metavar="INPUT", help="ONNX model file(s)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-o", "--output", metavar="OUT", help="output file (one INPUT only)")
    where.add_argument("--out-dir", metavar="DIR", help="write each folded model under DIR, same file name")
    where.add_argument("--in-place", action="store_true", help="replace each INPUT atomically")
    p.add_argument("--dry-run", action="store_true", help="report what would be folded, write nothing")
    p.add_argument("--report", metavar="FILE.json", help="write the fold report(s) as JSON")
    p.add_argument("--json", action="store_true", help="print the report(s) as one JSON document")
    p.add_argument("--exclude-node", action="append", default=[], metavar="NAME",
                   help="leave this BatchNormalization node as it is (repeatable)")
    p.add_argument("--external-data", action="store_true",
                   help="store weights in OUT.data next to the output (automatic above 2 GB)")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="fold N files in parallel")
    checks = p.add_argument_group("verification (the flags of `bnfold verify`)")
    checks.add_argument("--verify", action="store_true",
                        help="compare the folded model with the original in onnxruntime before writing; "
                             "on a mismatch write nothing and exit 1")
    add_verify_arguments(checks)
    speed = p.add_argument_group("speed (the flags of `bnfold bench`, prefixed with --bench-)")
    speed.add_argument("--bench", action="store_true",
                       help="after writing, measure original vs folded in onnxruntime (bnfold bench)")
    add_bench_arguments(speed, prefix=BENCH_PREFIX)
    p.set_defaults(func=cmd_fold)


def cmd_fold(args) -> int:
    from .fold import VerificationFailed
    from .foldcmd import FoldJob, run_fold_jobs
    verify = verify_options_from_args(args) if args.verify else None
    if args.bench and args.dry_run:
        raise BnfoldError("--bench measures the written model", note="drop --dry-run")
    jobs = [FoldJob(path, _fold_target(args, path), tuple(args.exclude_node), args.dry_run, args.external_data,
                    verify) for path in args.models]
    outcomes = run_fold_jobs(jobs, args.jobs)
    reports = [o.report if isinstance(o, VerificationFailed) else o for o in outcomes
               if not isinstance(o, BnfoldError) or isinstance(o, VerificationFailed)]
    for report in reports:
        _print_notes(getattr(report.verification, "notes", ()))
    if args.bench:
        _bench_folded(args, [(job, o) for job, o in zip(jobs, outcomes) if not isinstance(o, BnfoldError)])
    if reports:
        _emit_fold_reports(args, reports)
    errors = [o for o in outcomes if isinstance(o, BnfoldError)]
    for error in errors:
        print(f"bnfold: error: {with_flag(error).one_line()}", file=sys.stderr)
    return max((e.exit_code for e in errors), default=EXIT_OK)


def _bench_folded(args, folded) -> None:
    """`fold --bench`: measure each written model against its input; the result joins the report."""
    from .bench import bench_models, require_matplotlib, write_plot
    try:
        options = bench_options_from_args(args, prefix=BENCH_PREFIX)
        if options.plot:
            require_matplotlib()
        for job, report in folded:
            report.bench = bench_models(job.source, job.target, options)
            if options.plot:
                write_plot(report.bench, options.plot)
    except BnfoldError as error:
        raise with_flag(error, prefix=BENCH_PREFIX) from error


def _fold_target(args, path: str) -> str | None:
    """Where a folded model goes; refuse anything that would overwrite an input by accident."""
    import os
    if args.dry_run:
        return None
    if args.in_place:
        return path
    if args.output:
        if len(args.models) != 1:
            raise BnfoldError("-o takes one INPUT", note="use --out-dir DIR for several inputs")
        target = args.output
    elif args.out_dir:
        if not os.path.isdir(args.out_dir):
            raise BnfoldError(f"{args.out_dir}: output folder does not exist")
        target = os.path.join(args.out_dir, os.path.basename(path))
    else:
        raise BnfoldError("no output given", note="use -o OUT, --out-dir DIR, --in-place or --dry-run")
    if os.path.exists(target) and os.path.exists(path) and os.path.samefile(target, path):
        raise BnfoldError(f"{target}: output is the input file", note="use --in-place to replace it")
    return target


def _emit_fold_reports(args, reports) -> None:
    import json
    document = reports[0].to_dict() if len(reports) == 1 else {"models": [r.to_dict() for r in reports]}
    if args.report:
        from .io import write_text_atomic
        write_text_atomic(args.report, json.dumps(document, indent=2) + "\n")
    if args.json:
        print(json.dumps(document, indent=2))
        return
    from .report import summary_table
    console = _console()
    for report in reports:
        verb = "would fold" if args.dry_run else "folded"
        console.print(f"{report.model}: {verb} {report.folded} of {report.total} BatchNormalization",
                      highlight=False, soft_wrap=True)
        console.print(summary_table(report))
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
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
    import json
    from .fold import fold_file
    from .report import decisions_table, passes_table, summary_table
    report = fold_file(args.input, None, exclude_nodes=args.exclude_node, dry_run=True)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return EXIT_OK
    console = _console()
    console.print(f"{args.input}: {report.total} BatchNormalization, {report.folded} foldable",
                  highlight=False, soft_wrap=True)
    console.print(decisions_table(report))
    console.print(passes_table(report))
    console.print(summary_table(report))
    return EXIT_OK


def _console():
    from rich.console import Console
    return Console(width=None if sys.stdout.isatty() else 160, soft_wrap=False)


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
    for add in (_add_fold_parser, _add_inspect_parser, _add_verify_parser, _add_bench_parser,
                _add_export_parser):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; turn every error into a one-line message and an exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version exit 0, usage errors exit 2
        return int(exc.code or 0)
    try:
        return args.func(args)
    except BnfoldError as exc:
        if args.debug:
            raise
        print(f"bnfold: error: {with_flag(exc).one_line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("bnfold: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in bnfold: still one line unless --debug
        if args.debug:
            raise
        print(f"bnfold: internal error: {type(exc).__name__}: {exc}. Note: rerun with --debug "
              "for the traceback and report it.", file=sys.stderr)
        return EXIT_INTERNAL


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("bnfold")
    except PackageNotFoundError:
        return "unknown"
