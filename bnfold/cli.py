"""The `bnfold` command line: one small function per subcommand over the library.

Exit codes: 0 success, 1 a check failed, 2 bad usage or bad input, 3 internal error (a bug).
Tables go to stdout; with --json exactly one JSON document goes to stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import sys

from .errors import EXIT_USAGE, BnfoldError

EXIT_INTERNAL = 3


# ---------------------------------------------------------------------------------------------- fold
def _add_fold_parser(sub) -> None:
    p = sub.add_parser("fold", help="fold BatchNormalization nodes into neighbouring linear ops",
                       description="Fold every BatchNormalization that can be folded exactly into its "
                                   "neighbouring Conv, ConvTranspose, Gemm or MatMul; leave the others "
                                   "with a reason.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="ONNX model file(s)")
    p.set_defaults(func=cmd_fold)


def cmd_fold(args) -> int:
    raise BnfoldError("fold: not implemented yet")


# ------------------------------------------------------------------------------------------- inspect
def _add_inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="show each BatchNormalization and what fold would do with it")
    p.add_argument("input", metavar="INPUT")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
    raise BnfoldError("inspect: not implemented yet")


# -------------------------------------------------------------------------------------------- verify
def _add_verify_parser(sub) -> None:
    p = sub.add_parser("verify", help="compare two models output by output with onnxruntime")
    p.add_argument("reference", metavar="REFERENCE")
    p.add_argument("candidate", metavar="CANDIDATE")
    p.set_defaults(func=cmd_verify)


def cmd_verify(args) -> int:
    raise BnfoldError("verify: not implemented yet")


# --------------------------------------------------------------------------------------------- bench
def _add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure session creation and latency of two models, A/B interleaved")
    p.add_argument("baseline", metavar="BASELINE")
    p.add_argument("candidate", metavar="CANDIDATE")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    raise BnfoldError("bench: not implemented yet")


# -------------------------------------------------------------------------------------------- export
def _add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="export a torch model to ONNX with every BatchNorm kept")
    p.add_argument("model", metavar="NAME|module:callable")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    raise BnfoldError("export: not implemented yet")


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
        print(f"bnfold: error: {exc.one_line()}", file=sys.stderr)
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
