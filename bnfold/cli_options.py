"""The flags of verify and bench and of fold's optional passes, how they become option objects, and how
errors name them again.

The library takes VerifyOptions and BenchOptions and names a parameter (``BnfoldError.option``) when one
is at fault; this module owns the other direction: parameter -> flag. `fold` takes verify's flags as
they are and bench's with a ``--bench-`` prefix. Nothing here imports onnxruntime: building the parser
must stay quick.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import fields

from .bench import DEFAULT_SECONDS, MAX_PAIRS, MIN_PAIRS, PLOT_HINT, BenchOptions
from .errors import BnfoldError
from .inputs import BATCHES, OTHER_DIM, parse_shape
from .runtime import LEVELS
from .verify import VerifyOptions
from .verify_quantized import DEFAULT_MAX_FLIPPED, DEFAULT_MAX_STEPS

# library parameter -> flag name (without the leading dashes and any prefix)
FLAGS = {
    "inputs": "inputs", "shapes": "shape", "samples": "samples", "seed": "seed", "atol": "atol",
    "rtol": "rtol", "provider": "provider", "bisect": "bisect", "levels": "level", "threads": "threads",
    "batch": "batch", "warmup": "warmup", "runs": "runs", "seconds": "seconds", "creations": "creations",
    "plot": "plot", "input_shapes": "input-shape", "opset": "opset", "exporter": "exporter",
    "exclude_nodes": "exclude-node", "jobs": "jobs", "assume_inference": "assume-inference",
    "lower_standalone": "lower-standalone", "reparameterize": "no-reparameterize",
    "quantized": "quantized", "max_steps": "max-steps", "max_flipped": "max-flipped",
}


def flag_of(option: str, prefix: str = "") -> str | None:
    """The command-line flag of library parameter `option` (`prefix` as in add_bench_arguments)."""
    name = FLAGS.get(option)
    return None if name is None else f"--{prefix}{name}"


def with_flag(error: BnfoldError, prefix: str = "") -> BnfoldError:
    """`error` with the flag of its option in front of the message (and no option left to name)."""
    flag = flag_of(error.option, prefix) if error.option else None
    if flag is None:
        return error
    flagged = BnfoldError(f"{flag}: {error.message}", note=error.note, exit_code=error.exit_code)
    flagged.__cause__ = error
    return flagged


def shape_defaults_hint(note: str) -> str:
    """A verify note, with the flag that overrides symbolic-dim defaults when it reports them."""
    from .inputs import DEFAULTS_NOTE

    return f"{note}; set them with --shape NAME=DxDx..." if note.startswith(DEFAULTS_NOTE) else note


# ------------------------------------------------------------------------------------------ passes
def add_pass_arguments(parser) -> None:
    """The flags of the passes that run on request or can be turned off (FoldOptions), for fold and inspect. The value of
    --lower-standalone is checked by the library (bnfold.fold.fold_options): one line, not usage."""
    parser.add_argument("--assume-inference", action="store_true",
                        help="rewrite each BatchNormalization exported in training mode to normalize with "
                             "its running statistics, then fold it; this changes what the model computes "
                             "(a note names each node)")
    parser.add_argument("--no-reparameterize", action="store_true",
                        help="do not merge parallel Conv / identity branches over one input into one Conv "
                             "(RepVGG, MobileOne, RepGhost, ACNet)")
    parser.add_argument("--lower-standalone", default="keep", metavar="{keep,mul-add}",
                        help="each BatchNormalization left after folding: keep it (default), or rewrite it "
                             "as Mul then Add (for runtimes without BatchNormalization)")


# -------------------------------------------------------------------------------------------- verify
def add_verify_arguments(parser) -> tuple[argparse.Action, ...]:
    """The input and tolerance flags `verify` and `fold --verify` share. Every default is None, so
    :func:`given_flags` can tell which were given; returns the actions added."""
    return (
        parser.add_argument("--inputs", metavar="FILE.npz|DIR",
                            help="input values: one .npz (keys: input names) or a folder of them, one "
                                 "sample each (default: seeded random inputs)"),
        parser.add_argument("--shape", action="append", metavar="NAME=DxDx...",
                            help="concrete shape of an input with symbolic dims (repeatable; 'x' or 'X' "
                                 "between dims, NAME= for a scalar); default: a symbolic dim 0 is tried at "
                                 f"{' and '.join(map(str, BATCHES))}, any other symbolic dim is {OTHER_DIM}"),
        parser.add_argument("--samples", type=int, metavar="N",
                            help="random input samples per batch size (default 1)"),
        parser.add_argument("--seed", type=int, metavar="S", help="seed of the random inputs (default 0)"),
        parser.add_argument("--atol", type=_tolerance, metavar="A",
                            help="absolute tolerance for every output dtype (default: per dtype)"),
        parser.add_argument("--rtol", type=_tolerance, metavar="R",
                            help="relative tolerance for every output dtype (default: per dtype)"),
        parser.add_argument("--provider", metavar="P",
                            help="onnxruntime execution provider, e.g. cuda (default: CPU)"),
        parser.add_argument("--quantized", action="store_true", default=None,
                            help="judge a quantized model layer by layer: feed each QuantizeLinear the "
                                 "original's codes upstream and compare its input and codes; the final "
                                 "outputs are shown for information"),
        parser.add_argument("--max-steps", type=_tolerance, metavar="S",
                            help="with --quantized: how far a quantizer's input may move, in quantization "
                                 f"steps (default {DEFAULT_MAX_STEPS:g})"),
        parser.add_argument("--max-flipped", type=_tolerance, metavar="F",
                            help="with --quantized: the share of a quantizer's codes that may flip "
                                 f"(default {DEFAULT_MAX_FLIPPED:g}, one code at least)"),
    )


def given_flags(args, actions) -> list[str]:
    """The flags among `actions` (as add_verify_arguments / add_bench_arguments return them) that the
    command line gave: their defaults are None, so a given flag is one whose value is not."""
    return [action.option_strings[0] for action in actions if getattr(args, action.dest) is not None]


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def verify_options_from_args(args) -> VerifyOptions:
    """VerifyOptions from the flags of add_verify_arguments (and --bisect, where the parser has it)."""
    return VerifyOptions(inputs=args.inputs, shapes=_shapes(args.shape), samples=args.samples,
                         seed=args.seed, atol=args.atol, rtol=args.rtol, provider=args.provider,
                         bisect=getattr(args, "bisect", False), quantized=bool(args.quantized),
                         max_steps=args.max_steps, max_flipped=args.max_flipped)


def _shapes(texts) -> dict[str, tuple[int, ...]]:
    """NAME=DIMS texts -> {name: dims}; each name once."""
    shapes: dict[str, tuple[int, ...]] = {}
    for text in texts or ():
        name, shape = parse_shape(text)
        if name in shapes:
            raise BnfoldError(f"{name}=...: given twice", option="shapes")
        shapes[name] = shape
    return shapes


# --------------------------------------------------------------------------------------------- bench
def add_bench_arguments(parser, prefix: str = "") -> tuple[argparse.Action, ...]:
    """Add the measurement options to an argparse parser; returns the actions added.

    `prefix="bench-"` names them `--bench-runs`, `--bench-level`, ... so a command with options of its
    own (`fold --bench`) can take them without clashes; :func:`bench_options_from_args` reads them back.
    Each flag's value lands in the BenchOptions field of its name (prefixed); every argparse default
    is None (so :func:`given_flags` can tell which were given): the defaults are BenchOptions' own,
    filled in by bench_options_from_args.
    """
    d = BenchOptions()
    opt, key = f"--{prefix}", prefix.replace("-", "_")
    add = parser.add_argument
    amount = parser.add_mutually_exclusive_group()
    return (
        add(f"{opt}level", dest=f"{key}levels", metavar="LEVELS",
            help=f"comma-separated onnxruntime optimization levels out of {', '.join(LEVELS)} "
                 f"(default: {','.join(d.levels)})"),
        add(f"{opt}threads", type=int, metavar="N",
            help=f"intra-op threads per session (default: {d.threads}, for stable figures)"),
        add(f"{opt}batch", type=int, metavar="N",
            help=f"size of a symbolic first dimension (default: {d.batch}); other symbolic dimensions "
                 f"are {OTHER_DIM} unless --{prefix}shape says"),
        add(f"{opt}shape", dest=f"{key}shapes", action="append", metavar="NAME=1x3x224x224",
            help="the shape of one input (repeatable; 'x' or 'X' between dims, NAME= for a scalar)"),
        add(f"{opt}provider", metavar="P", help=f"onnxruntime execution provider (default: {d.provider})"),
        add(f"{opt}warmup", type=int, metavar="N", help=f"untimed pairs of runs first (default: {d.warmup})"),
        amount.add_argument(f"{opt}runs", type=int, metavar="N", help="timed pairs of runs per level"),
        amount.add_argument(f"{opt}seconds", type=float, metavar="S",
                            help=f"time budget per level (default: {DEFAULT_SECONDS:g} s, at least "
                                 f"{MIN_PAIRS} and at most {MAX_PAIRS} pairs)"),
        add(f"{opt}creations", type=int, metavar="N",
            help=f"session creations timed per model and level (default: {d.creations})"),
        add(f"{opt}seed", type=int, metavar="S",
            help=f"seed of the inputs and of the bootstrap (default: {d.seed})"),
        add(f"{opt}plot", metavar="FILE.png",
            help=f"write latency histograms per level (needs matplotlib: {PLOT_HINT})"),
    )


def bench_options_from_args(args, prefix: str = "") -> BenchOptions:
    """The BenchOptions that :func:`add_bench_arguments` (same prefix) parsed, BenchOptions' defaults
    where no flag was given; validated."""
    key = prefix.replace("-", "_")
    given = {f.name: getattr(args, key + f.name) for f in fields(BenchOptions)
             if getattr(args, key + f.name, None) is not None}
    if "levels" in given:
        given["levels"] = tuple(part.strip() for part in given["levels"].split(",") if part.strip())
    if "shapes" in given:
        given["shapes"] = _shapes(given["shapes"])
    options = BenchOptions(**given)
    options.validate()
    return options
