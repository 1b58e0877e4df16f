"""Property tests for the paths a BN folds across (rules/path.py): random chains of Identity, Dropout,
Add, Sub (both orders), Mul, Div and other BNs on either side of the BN, and random Transposes between
a MatMul and a BN. Each model either folds and computes what the original does (onnxruntime with
optimizations off and onnx's reference evaluator), or keeps its BNs with a documented reason: never a
wrong model. Where every step is exact the BN must fold, and only the steps it folds across go."""

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnfold.fold import fold_model
from tests.builders import assert_same_function, op_types
from tests.rules.test_paths import Path, per_channel

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TRANSPARENT = ("Identity", "Dropout")
AFFINE = ("Add", "Sub", "SubFirst", "Mul", "Div")
# a step, and the form of its constant: per channel, one scalar, or varying along a non-channel axis
STEP = st.tuples(st.sampled_from(AFFINE + TRANSPARENT + ("BN",)), st.sampled_from(["channel", "scalar", "other"]))
STEPS = st.lists(STEP, max_size=3)
LINEAR = st.sampled_from(["Conv", "Gemm", "MatMul"])


def is_bad(step) -> bool:
    """An affine step whose constant varies along another axis than the channels."""
    return step[0] in AFFINE and step[1] == "other"


def add_step(path: Path, rng, step, channels: int, kind: str) -> None:
    """Append `step` to `path`, its constant laid out for the output of `kind` ([N, C, H, W] or [M, C])."""
    op, form = step
    if op in TRANSPARENT:
        path.add(op)
    elif op == "BN":
        path.bn(channels, name=f"bn{len(path.nodes)}")
    else:
        if form == "scalar":
            value = per_channel(rng, 1, ())
        elif form == "channel":
            value = per_channel(rng, channels, (channels, 1, 1) if kind == "Conv" else (channels,))
        else:  # over space (Conv [N, C, 3, 3]) or over the rows ([3, C])
            value = per_channel(rng, 3, (3, 1))
        path.add(op.replace("First", ""), value, const_first=op.endswith("First"))


def trailing_transparent(steps) -> list[str]:
    """The transparent steps after the last other step: a fold leaves them."""
    kept = []
    for op, _ in steps:
        kept = kept + [op] if op in TRANSPARENT else []
    return kept


def leading_transparent(steps) -> list[str]:
    """The transparent steps before the first other step: a fold leaves them."""
    return trailing_transparent(steps[::-1])[::-1]


def check_function(model, folded, report, reasons):
    """One decision per BN, in graph order, each with one of `reasons`; the folded model is valid,
    keeps its output names and computes what the original does."""
    assert [d.node for d in report.decisions] == \
        [n.name for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert {d.reason for d in report.decisions} <= reasons, report.decisions
    onnx.checker.check_model(folded, full_check=True)
    assert [o.name for o in folded.graph.output] == [o.name for o in model.graph.output]
    assert_same_function(model, folded, atol=1e-3, rtol=1e-3)


@SETTINGS
@given(kind=LINEAR, channels=st.integers(1, 4), before=STEPS, after=STEPS, seed=st.integers(0, 2**16))
def test_producer_side_chains(kind, channels, before, after, seed):
    """linear op -> before... -> BN -> after... -> Relu. The first BN folds, with every step up to the
    first constant that is not per channel; a BN with such a constant on its path stays."""
    rng = np.random.default_rng(seed)
    path = Path(rng, [2, 3, 3, 3] if kind == "Conv" else [3, 4])
    {"Conv": lambda: path.conv(3, channels), "Gemm": lambda: path.gemm(4, channels),
     "MatMul": lambda: path.matmul(4, channels)}[kind]()
    if kind == "MatMul" and before and before[0][0] == "Add":
        # the Add right after a MatMul is its bias, which may vary along the rows: keep this test's
        # "other" constants for the steps that must refuse them
        before = [("Add", "channel" if before[0][1] == "other" else before[0][1])] + before[1:]
    for step in before:
        add_step(path, rng, step, channels, kind)
    path.bn(channels, name="bn")
    for step in after:
        add_step(path, rng, step, channels, kind)
    model = path.add("Relu", name="relu").model()
    folded, report = fold_model(model)
    check_function(model, folded, report, {"folded", "not-per-channel"})
    steps = before + [("BN", "")] + after
    first_bn = next(i for i, s in enumerate(steps) if s[0] == "BN")
    first_bad = next((i for i, s in enumerate(steps) if is_bad(s)), None)
    reasons = [d.reason for d in report.decisions]
    linear = [kind] + (["Add"] if kind == "MatMul" else [])
    if first_bad is None:
        assert set(reasons) == {"folded"}
        assert op_types(folded) == linear + trailing_transparent(steps) + ["Relu"]
    elif first_bad < first_bn:
        assert set(reasons) == {"not-per-channel"}
        assert folded.SerializeToString() == model.SerializeToString()
    else:
        assert reasons[0] == "folded" and set(reasons[1:]) <= {"folded", "not-per-channel"}
        assert op_types(folded)[:len(linear)] == linear
        assert model.graph.node[1 + first_bad].name in {n.name for n in folded.graph.node}


@SETTINGS
@given(kind=LINEAR, channels=st.integers(1, 4), before=STEPS, after=STEPS, seed=st.integers(0, 2**16))
def test_consumer_side_chains(kind, channels, before, after, seed):
    """Relu -> before... -> BN -> after... -> unpadded Conv / Gemm / MatMul: the first BN folds forward,
    with the steps before it up to the first constant that is not per channel."""
    rng = np.random.default_rng(seed)
    path = Path(rng, [2, channels, 3, 3] if kind == "Conv" else [3, channels]).add("Relu", name="relu")
    for step in before:
        add_step(path, rng, step, channels, kind)
    path.bn(channels, name="bn")
    for step in after:
        add_step(path, rng, step, channels, kind)
    {"Conv": lambda: path.conv(channels, 5), "Gemm": lambda: path.gemm(channels, 5),
     "MatMul": lambda: path.matmul(channels, 5)}[kind]()
    model = path.model()
    folded, report = fold_model(model)
    check_function(model, folded, report, {"folded", "not-per-channel"})
    steps = before + [("BN", "")] + after
    first_bn = next(i for i, s in enumerate(steps) if s[0] == "BN")
    bad = [i for i, s in enumerate(steps) if is_bad(s)]
    first = report.decisions[0]
    linear = [kind] + (["Add"] if kind == "MatMul" else [])
    if not bad:
        assert {d.reason for d in report.decisions} == {"folded"}
        assert op_types(folded) == ["Relu"] + leading_transparent(steps) + linear
    elif bad[-1] > first_bn:
        assert first.reason == "not-per-channel", first
    else:
        assert first.reason == "folded", first
        assert model.graph.node[1 + bad[-1]].name in {n.name for n in folded.graph.node}


@SETTINGS
@given(rank=st.integers(2, 4), channels=st.integers(1, 4), back=st.booleans(), data=st.data(),
       seed=st.integers(0, 2**16))
def test_matmul_transpose_bn(rank, channels, back, data, seed):
    """MatMul [..., C] -> Transpose(perm) -> BN (-> Transpose back): folds exactly when the perm puts
    the MatMul's columns on the BN's axis 1."""
    rng = np.random.default_rng(seed)
    perm = data.draw(st.permutations(range(rank)))
    shape = [int(d) for d in rng.integers(2, 4, rank - 1)] + [channels]  # the MatMul's output
    path = Path(rng, shape[:-1] + [4]).matmul(4, channels).add("Transpose", perm=list(perm))
    path.bn(shape[perm[1]], name="bn")
    if back:
        path.add("Transpose", perm=[int(i) for i in np.argsort(perm)], name="back")
    model = path.model()
    folded, report = fold_model(model)
    check_function(model, folded, report, {"folded", "channel-axis-mismatch"})
    if perm[1] == rank - 1:
        assert report.decisions[0].reason == "folded"
        assert op_types(folded) == ["MatMul", "Add", "Transpose"] + (["Transpose"] if back else [])
    else:
        assert report.decisions[0].reason == "channel-axis-mismatch"
        assert folded.SerializeToString() == model.SerializeToString()


@SETTINGS
@given(rank=st.integers(2, 4), channels=st.integers(2, 4), data=st.data(), seed=st.integers(0, 2**16))
def test_bn_transpose_matmul(rank, channels, data, seed):
    """BN [N, C, ...] -> Transpose(perm) -> MatMul: folds exactly when the perm puts the BN's channels
    last, onto the weight's rows (C >= 2: one channel would be exact along any axis)."""
    rng = np.random.default_rng(seed)
    perm = data.draw(st.permutations(range(rank)))
    shape = [int(rng.integers(2, 4)), channels] + [int(d) for d in rng.integers(2, 4, rank - 2)]
    path = Path(rng, shape).add("Relu", name="relu").bn(channels, name="bn").add("Transpose", perm=list(perm))
    model = path.matmul(shape[perm[-1]], 5).model()
    folded, report = fold_model(model)
    check_function(model, folded, report, {"folded", "channel-axis-mismatch"})
    if perm[-1] == 1:
        assert report.decisions[0].reason == "folded"
        assert op_types(folded) == ["Relu", "Transpose", "MatMul", "Add"]
    else:
        assert report.decisions[0].reason == "channel-axis-mismatch"
        assert folded.SerializeToString() == model.SerializeToString()


# ------------------------------------------------------------------------------------- across shape ops
# Layouts of the same [2, C, 3, 3] values: each move is a Reshape or Transpose that keeps every element's
# channel, so a BN folds across any walk of them.
LAYOUTS = {"nchw": (lambda c: [2, c, 3, 3], 1), "ncl": (lambda c: [2, c, 9], 1), "nhwc": (lambda c: [2, 3, 3, c], 3),
           "nlc": (lambda c: [2, 9, c], 2), "rows": (lambda c: [18, c], 1)}
MOVES = {("nchw", "ncl"): "Reshape", ("ncl", "nchw"): "Reshape", ("nchw", "nhwc"): [0, 2, 3, 1],
         ("nhwc", "nchw"): [0, 3, 1, 2], ("ncl", "nlc"): [0, 2, 1], ("nlc", "ncl"): [0, 2, 1],
         ("nhwc", "nlc"): "Reshape", ("nlc", "nhwc"): "Reshape", ("nlc", "rows"): "Reshape",
         ("nhwc", "rows"): "Reshape", ("rows", "nlc"): "Reshape"}
CHANNELS_AT_1 = ("nchw", "ncl", "rows")  # where a BN may normalize them


def move(path: Path, layout: str, target: str, channels: int) -> str:
    """Append the shape op from `layout` to `target`; returns `target`."""
    how = MOVES[layout, target]
    if how == "Reshape":
        path.add("Reshape", np.array(LAYOUTS[target][0](channels)))
    else:
        path.add("Transpose", perm=how)
    return target


def route(layout: str, until) -> list[str]:
    """The fewest moves from `layout` to one of `until` (breadth first)."""
    paths = [[layout]]
    while paths[0][-1] not in until:
        paths = paths[1:] + [paths[0] + [target] for source, target in MOVES if source == paths[0][-1]]
    return paths[0][1:]


def walk_step(path: Path, rng, layout: str, choice: int, channels: int) -> str:
    """Either a move to another layout (a shape op) or a per-channel affine step in this one."""
    if choice % 2 == 0:
        moves = [target for source, target in MOVES if source == layout]
        return move(path, layout, moves[choice // 2 % len(moves)], channels)
    shape, axis = LAYOUTS[layout][0](channels), LAYOUTS[layout][1]
    op = AFFINE[choice // 2 % len(AFFINE)]
    value = per_channel(rng, channels, (channels,) + (1,) * (len(shape) - 1 - axis))
    path.add(op.replace("First", ""), value, const_first=op.endswith("First"))
    return layout


def walk(path: Path, rng, layout: str, choices, channels: int, until) -> None:
    """The steps `choices` pick from `layout`, then the moves to one of the layouts `until`."""
    for choice in choices:
        layout = walk_step(path, rng, layout, choice, channels)
    for target in route(layout, until):
        layout = move(path, layout, target, channels)


def shape_ops(model) -> list[str]:
    return [op for op in op_types(model) if op in ("Reshape", "Transpose")]


@SETTINGS
@given(start=st.sampled_from(["Conv", "MatMul", "Gemm"]), channels=st.integers(1, 4),
       choices=st.lists(st.integers(0, 99), max_size=6), seed=st.integers(0, 2**16))
def test_producer_side_walks_over_layouts(start, channels, choices, seed):
    """Conv [2, C, 3, 3] / MatMul [2, 9, C] / Gemm [18, C] -> shape ops and affine steps -> BN."""
    rng = np.random.default_rng(seed)
    if start == "Conv":
        path, layout = Path(rng, [2, 3, 3, 3]).conv(3, channels), "nchw"
    elif start == "MatMul":
        path, layout = Path(rng, [2, 9, 4]).matmul(4, channels), "nlc"
    else:
        path, layout = Path(rng, [18, 4]).gemm(4, channels), "rows"
    walk(path, rng, layout, choices, channels, CHANNELS_AT_1)
    model = path.bn(channels).add("Relu").model()
    folded, report = fold_model(model)
    check_function(model, folded, report, {"folded"})
    assert not set(AFFINE) & set(op_types(folded)) - ({"Add"} if start == "MatMul" else set())
    assert shape_ops(folded) == shape_ops(model) and "BatchNormalization" not in op_types(folded)


@SETTINGS
@given(end=st.sampled_from(["Conv", "MatMul", "Gemm"]), start=st.sampled_from(CHANNELS_AT_1),
       channels=st.integers(1, 4), choices=st.lists(st.integers(0, 99), max_size=6), seed=st.integers(0, 2**16))
def test_consumer_side_walks_over_layouts(end, start, channels, choices, seed):
    """BN -> shape ops and affine steps -> Conv (over [2, C, 3, 3]) / MatMul (channels last) / Gemm."""
    rng = np.random.default_rng(seed)
    path = Path(rng, LAYOUTS[start][0](channels)).add("Relu").bn(channels)
    until = {"Conv": ("nchw",), "MatMul": ("nhwc", "nlc", "rows"), "Gemm": ("rows",)}[end]
    walk(path, rng, start, choices, channels, until)
    {"Conv": lambda: path.conv(channels, 5), "Gemm": lambda: path.gemm(channels, 5),
     "MatMul": lambda: path.matmul(channels, 5)}[end]()
    model = path.model()
    folded, report = fold_model(model)
    check_function(model, folded, report, {"folded"})
    assert not set(AFFINE) & set(op_types(folded)) - ({"Add"} if end == "MatMul" else set())
    assert shape_ops(folded) == shape_ops(model) and "BatchNormalization" not in op_types(folded)
