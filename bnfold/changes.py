"""What each decision changed in the graph, by name, so every changed tensor maps back to its source.

:class:`bnfold.graph.GraphIndex` logs every initializer it writes or creates and every node it
removes or inserts in the model's :class:`ChangeLog`; a pass wraps each rewrite in
:meth:`ChangeLog.capture` and stores the :class:`Changes` on the rewrite's decision. Names only: the
report says which tensors a fold touched, never their values.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

REWRITTEN, CREATED, NODE_REMOVED, NODE_ADDED = "rewritten", "created", "node-removed", "node-added"


@dataclass
class Changes:
    """The initializers a decision overwrote (same name) or created (a new name), and the nodes it
    removed or added ({"name", "op_type"}); all empty for a decision that changed nothing."""
    initializers_rewritten: list[str] = field(default_factory=list)
    initializers_created: list[str] = field(default_factory=list)
    nodes_removed: list[dict[str, str]] = field(default_factory=list)
    nodes_added: list[dict[str, str]] = field(default_factory=list)


class ChangeLog:
    """The edits made to one model, in order."""

    def __init__(self) -> None:
        self._events: list[tuple[str, str, str]] = []  # (kind, name, op type of a node)

    def record(self, kind: str, name: str, op_type: str) -> None:
        self._events.append((kind, name, op_type))

    @contextmanager
    def capture(self) -> Iterator[Changes]:
        """Yield a Changes that, once the block ends, holds the edits made inside it: a tensor created
        and then written again is created; a node added and removed again is neither."""
        changes = Changes()
        start = len(self._events)
        try:
            yield changes
        finally:
            _summarize(self._events[start:], changes)


def _summarize(events: list[tuple[str, str, str]], changes: Changes) -> None:
    created = {name for kind, name, _ in events if kind == CREATED}
    changes.initializers_created = list(dict.fromkeys(n for k, n, _ in events if k == CREATED))
    changes.initializers_rewritten = list(dict.fromkeys(n for k, n, _ in events if k == REWRITTEN and n not in created))
    added = [(name, op) for kind, name, op in events if kind == NODE_ADDED]
    removed = [(name, op) for kind, name, op in events if kind == NODE_REMOVED]
    transient = Counter(added) & Counter(removed)
    changes.nodes_removed = [{"name": n, "op_type": op} for n, op in _without(removed, transient)]
    changes.nodes_added = [{"name": n, "op_type": op} for n, op in _without(added, transient)]


def _without(nodes: list[tuple[str, str]], transient: Counter) -> list[tuple[str, str]]:
    """`nodes` less one occurrence per count in `transient` (unnamed nodes repeat, so count them)."""
    left = Counter(transient)
    kept = []
    for node in nodes:
        if left[node]:
            left[node] -= 1
        else:
            kept.append(node)
    return kept
