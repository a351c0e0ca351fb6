"""The exceptions graphsel raises.  Every message says what went wrong, where, and how to fix it."""
from __future__ import annotations


class GraphselError(Exception):
    """Base class of every error graphsel raises on purpose."""


class TraceError(GraphselError):
    """The model could not be traced into a torch.fx graph, even with automatic leafing.

    Attributes: ``module_path`` (dotted path of the module whose code failed, ``""`` for the
    root), ``source_line`` (``file:line: code`` of the failing statement when known) and
    ``remedy`` (what to try).
    """

    def __init__(self, message: str, *, module_path: str = "", source_line: str = "", remedy: str = ""):
        self.module_path = module_path
        self.source_line = source_line
        self.remedy = remedy
        parts = [message]
        if module_path or module_path == "":
            parts.append(f"  module: {module_path or '<root model>'}")
        if source_line:
            parts.append(f"  at: {source_line}")
        if remedy:
            parts.append(f"  fix: {remedy}")
        super().__init__("\n".join(parts))


class PassError(GraphselError):
    """A pass failed, returned something invalid, or produced a graph that fails its checks.
    The user's model is untouched."""

    def __init__(self, pass_name: str, message: str):
        self.pass_name = pass_name
        super().__init__(f"pass '{pass_name}': {message}")


class FunctionChangedError(PassError):
    """A pass changed the function of the graph beyond what its contract allows."""

    def __init__(self, pass_name: str, contract: str, max_abs: float, max_rel: float, tolerance: float,
                 node: str | None = None, node_detail: str = ""):
        self.contract = contract
        self.max_abs = max_abs
        self.max_rel = max_rel
        self.tolerance = tolerance
        self.node = node
        where = f"; first diverging node: {node}" if node else ""
        detail = f" ({node_detail})" if node_detail else ""
        super().__init__(
            pass_name,
            f"contract '{contract}' violated: max abs error {max_abs:.3g}, max rel error {max_rel:.3g} "
            f"(tolerance {tolerance:.3g}){where}{detail}. The input model is unchanged; "
            f"report this with the model, or run the pass with verify=False to inspect its output.")


class MaskError(GraphselError):
    """A channel mask cannot be applied: it names a frozen group, an unknown module, or removes
    every channel of a group."""


class ExampleInputError(GraphselError, ValueError):
    """The example inputs do not fit the model."""


class DistributedError(GraphselError, RuntimeError):
    """A torch.distributed collective of graphsel failed (a peer process died, or did not answer
    within the process group's timeout), or the ranks disagree on something they must share.

    Attributes: ``collective`` (what graphsel was doing, e.g. ``"all_reduce of dealloc's
    statistics"``), ``rank`` and ``world_size`` (of the process that raised, in its group)."""

    def __init__(self, message: str, *, collective: str = "", rank: int | None = None,
                 world_size: int | None = None):
        self.collective = collective
        self.rank = rank
        self.world_size = world_size
        super().__init__(message)


class ReplicaMismatchError(DistributedError, AssertionError):
    """The replicas of a model differ across ranks (:func:`graphsel.distributed.assert_replicas_equal`).
    ``name`` is the first parameter or buffer that differs; ``ranks`` the ranks that hold another value
    than rank 0."""

    def __init__(self, message: str, *, name: str, ranks: list[int], rank: int | None = None,
                 world_size: int | None = None):
        self.name = name
        self.ranks = ranks
        super().__init__(message, collective="assert_replicas_equal", rank=rank, world_size=world_size)
