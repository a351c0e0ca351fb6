"""The pass abstraction: a small object with a name, a contract and ``run(gm, ctx) -> PassResult``.

A pass author writes::

    @register_pass
    class MyPass(Pass):
        '''Contract: exact. Replaces ... ; skips ... (reported).'''
        name = "my_pass"
        contract = Contract.EXACT
        def __init__(self, threshold: float = 0.5):
            super().__init__(threshold=threshold)
            ...
        def run(self, gm, ctx):
            ...
            return PassResult(gm, modified=True, stats={"rewritten": 3}, diagnostics=[...])

and gets tracing, copying, linting, contract verification, reporting and error handling from
:func:`graphsel.transform`.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.fx as fx

from graphsel.pipeline.context import PassContext


class Contract(str, enum.Enum):
    """What a pass promises about the function of the graph.

    * ``exact``: outputs match the input graph (reference semantics, eval mode) within the
      dtype's float tolerance.
    * ``approximate``: outputs may move; the pass reports its measured deviation and, when it
      states a bound (``PassResult.bound``), the pipeline checks the deviation against it.
    * ``structural``: outputs change by design (pruning); the pass reports what it removed.
    """
    EXACT = "exact"
    APPROXIMATE = "approximate"
    STRUCTURAL = "structural"

    def __str__(self) -> str:
        return self.value


@dataclass
class Diagnostic:
    """Why a pass did (or did not) touch part of the graph.

    ``level``: ``"skip"`` (a candidate was not rewritten, and why), ``"info"`` or ``"warning"``.
    ``where``: node or module path the message is about.
    """
    message: str
    where: str = ""
    level: str = "skip"

    def __str__(self) -> str:
        return f"[{self.level}] {self.where + ': ' if self.where else ''}{self.message}"


@dataclass
class PassResult:
    """What a pass returns. ``gm`` may be the module it was given (edited in place: the pipeline
    always hands a pass its own copy) or a new one. ``bound`` is the maximum output deviation an
    approximate pass promises (absolute), checked by the pipeline when set. ``shapes_current``:
    the pass recorded every node's new ``tensor_meta`` itself; the pipeline then skips running the
    model to propagate shapes when it does not verify, and checks the recorded shapes against a
    real propagation when it does."""
    gm: fx.GraphModule
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    diagnostics: list[Diagnostic] = field(default_factory=list)
    bound: float | None = None
    shapes_current: bool = False


class Pass:
    """Base class of graph passes (see the module docstring).

    Subclasses set ``name`` (registry name), ``contract`` and implement :meth:`run`. Options are
    passed to ``__init__`` as keywords and stored with ``super().__init__(**options)``: each becomes
    an attribute of the same name, and ``options`` (shown by reports, the CLI and ``repr``) reads
    them back. A pass that edits the graph and then needs fresh analyses calls
    ``ctx.invalidate(gm)`` first; module selection goes through
    :class:`graphsel.pipeline.select.ModuleSelection` (``include=`` / ``exclude=``).
    """

    name: ClassVar[str] = ""
    contract: ClassVar[Contract] = Contract.EXACT
    #: The pipeline hands a pass a copy of the graph whose parameter and buffer tensors are
    #: shared with the previous graph: a pass replaces tensors (``module.weight = nn.Parameter(...)``,
    #: new modules) and never edits them in place. A pass that must edit tensors in place sets this
    #: to True and gets a full deep copy.
    inplace_tensors: ClassVar[bool] = False

    def __init__(self, **options: Any):
        # each option is an attribute of the same name (stored once); ``options`` reads them back
        for k, v in options.items():
            setattr(self, k, v)
        self._option_names = tuple(options)

    @property
    def options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._option_names}

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement run(gm, ctx)")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        """Run the pass outside a pipeline (no copy, no checks). A result that says it modified
        the graph gets a new graph version, so ``ctx``'s cached analyses of the old one no longer
        apply to it."""
        ctx = PassContext.for_graph(gm) if ctx is None else ctx
        result = self.run(gm, ctx)
        if isinstance(result, PassResult) and result.modified and isinstance(result.gm, fx.GraphModule):
            ctx.invalidate(result.gm)
        return result

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"
