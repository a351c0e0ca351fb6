"""``graphsel.transform``: trace, then run every pass through the same phases.

1. **prepare** — the reference outputs of the current graph (when verifying), the copy the pass
   works on (graph, modules and metadata copied; tensors shared copy-on-write), what the pass must
   not touch (tensor version counters);
2. **run** — the pass itself; any exception becomes a :class:`~graphsel.PassError` naming it;
3. **lint** — did the graph change? (see below) If so: every module and attribute target resolves,
   ``graph.lint()``, the code is regenerated and the graph gets a new version (its cached
   analyses no longer apply);
4. **shapes** — shapes re-propagated on the example inputs when the graph changed (a pass that
   derived them itself, ``shapes_current``, is believed without verification and checked with it);
5. **verify** — the contract against the previous graph (eval mode, example plus random inputs,
   dtype tolerances; masked graphs through the mask oracle); a violation raises
   :class:`~graphsel.FunctionChangedError` with the first diverging node. Each input's reference
   outputs are computed once and handed from pass to pass; a pass that left the graph, its
   tensors and its reference semantics as they were (``fold_masks`` when liveness adds nothing:
   the same code, the same parameter objects, the same mask-oracle plan) is the same computation,
   so its outputs are the reference's and nothing is run again; the shape propagation's forward
   on the example inputs doubles as the first verification forward of an unmasked graph;
6. **record** — a row of the pass history (time, nodes, params/MACs before and after, deviation).

``verify`` has one meaning: check every pass's contract against the previous graph. Without it
nothing needs the previous graph, and the pipeline uses that: passes edit the pipeline's graph
directly (no per-pass copies; a pass declaring ``inplace_tensors`` still gets a deep copy), the
traced copy holds the user's own Parameter objects until the end, when every tensor whose memory
is one of the user's parameters is cloned (the returned module never aliases the user's), and
"did the graph change?" is answered by the pass's ``modified`` flag checked against the graph's
fingerprint (with verification: the full shape signature — fingerprint, tensor shapes and leaf
module settings). A third-party pass that writes into a parameter without declaring it is
reported only after the write (through ``.data``, not at all): keep ``verify=True`` for untrusted
passes.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import TensorMetadata
from torch.utils._pytree import tree_leaves as pytree_leaves
from tqdm.auto import tqdm

from graphsel.errors import FunctionChangedError, GraphselError, PassError
from graphsel.ir.graph import graph_fingerprint, module_index, module_tensors, recompile
from graphsel.ir.meta import PassRecord, graphsel_meta
from graphsel.ir.shapes import propagate_shapes
from graphsel.ir.tracing import as_tuple, example_inputs_of, trace
from graphsel.pipeline.context import PassContext
from graphsel.pipeline.passbase import Contract, Pass, PassResult
from graphsel.pipeline.registry import resolve_passes
from graphsel.analysis.masks import get_masks, has_masks
from graphsel.pipeline.verify import (Deviation, compare_outputs, first_divergence, flatten_outputs,
                                      reference_forward)


@dataclass
class _Step:
    """One pass on its way through the phases."""
    p: Pass
    before: fx.GraphModule                    # the graph the pass was given (untouched when verifying)
    ctx: PassContext
    verify: bool
    reference: list[list[torch.Tensor]] | None
    signature: tuple                          # ``before``'s shape signature (fingerprint only without verify)
    work: fx.GraphModule = None               # what the pass runs on
    versions: dict = field(default_factory=dict)
    names_before: set[str] = field(default_factory=set)
    cost_before: tuple = (None, None)
    seconds: float = 0.0
    result: PassResult | None = None
    unchanged: bool = False
    new_signature: tuple | None = None
    deviation: Deviation | None = None
    checked: bool = False
    verify_seconds: float = 0.0
    new_reference: list[list[torch.Tensor]] | None = None
    propagated: list[torch.Tensor] | None = None   # outputs of the shape propagation on the example inputs
    snapshot: list[tuple[torch.Tensor, torch.Tensor]] | None = None   # (tensor, copy of its values) before the pass


def run_pass(p: Pass, gm: fx.GraphModule, ctx: PassContext, *, verify: bool = True,
             reference: list[list[torch.Tensor]] | None = None, rtol: float | None = None,
             atol: float | None = None, signature: tuple | None = None
             ) -> tuple[fx.GraphModule, PassRecord, list[list[torch.Tensor]] | None, tuple | None]:
    """Run one pass through the phases (module docstring); returns (new gm, history row, new
    reference outputs, the new gm's shape signature or None when it was not needed).
    ``reference`` / ``signature``: ``gm``'s, when the caller has them from the previous pass."""
    step = _prepare(p, gm, ctx, verify, reference, signature)
    _run(step)
    _lint(step)
    _shapes(step)
    _verify(step, rtol, atol)
    record = _record(step)
    return step.result.gm, record, step.new_reference, step.new_signature


def _prepare(p: Pass, gm: fx.GraphModule, ctx: PassContext, verify: bool, reference, signature) -> _Step:
    # a structural pass is checked on its output shapes alone: the outputs of the graph before it
    # are computed only for a pass that compares values (and then reused by the next one)
    if verify and reference is None and p.contract is not Contract.STRUCTURAL and ctx.verify_inputs():
        reference = [reference_forward(gm, x, ctx) for x in ctx.verify_inputs()]
        if ctx.check_finite:
            _check_finite_outputs(reference)
    # without verification nothing reads the previous graph again: the pass edits ``gm`` itself
    work = gm if not verify and not p.inplace_tensors else copy_for_pass(gm, p)
    index = module_index(gm)
    if signature is None:
        signature = (_shape_signature(work, index=index if work is gm else None) if verify
                     else (graph_fingerprint(gm, index),))
    snapshot = _snapshot(index) if verify and reference is not None and not p.inplace_tensors else None
    return _Step(p, gm, ctx, verify, reference, signature, work=work,
                 versions={} if p.inplace_tensors else _tensor_versions(index),
                 names_before={n.name for n in gm.graph.nodes}, cost_before=_cost_pair(gm, ctx), snapshot=snapshot)


def _run(step: _Step) -> None:
    p = step.p
    t0 = time.perf_counter()
    try:
        result = p.run(step.work, step.ctx)
    except GraphselError:
        raise
    except Exception as e:  # noqa: BLE001
        raise PassError(p.name, f"failed with {type(e).__name__}: {e}") from e
    step.seconds = time.perf_counter() - t0
    changed = [name for name, (t, v) in step.versions.items() if t._version != v]
    if changed:
        raise PassError(p.name, f"modified tensor '{changed[0]}' in place ({len(changed)} tensor(s)); passes share "
                                f"tensors with the previous graph and must replace them (copy-on-write), or set "
                                f"`inplace_tensors = True` on the pass class to get a deep copy")
    if not isinstance(result, PassResult):
        raise PassError(p.name, f"returned {type(result).__name__}, not a graphsel.PassResult")
    if not isinstance(result.gm, fx.GraphModule):
        raise PassError(p.name, f"PassResult.gm is a {type(result.gm).__name__}, not a torch.fx.GraphModule")
    result.gm.meta.setdefault("graphsel", graphsel_meta(step.work))
    step.result = result


def _lint(step: _Step) -> None:
    """Decide whether the graph changed; if so check it, regenerate its code, give it a new version.
    A pass that changed only metadata (masks) keeps the graph (valid before), the code, the shapes
    and the cached analyses of its copy."""
    new, result = step.result.gm, step.result
    new_index = module_index(new)
    fingerprint = graph_fingerprint(new, new_index)
    if step.verify:
        # the full signature only when the graph's fingerprint leaves the question open
        step.new_signature = (_shape_signature(new, fingerprint, new_index)
                              if new is step.work and fingerprint == step.signature[0] else None)
        step.unchanged = step.new_signature == step.signature
    else:
        step.new_signature = (fingerprint,)
        step.unchanged = new is step.work and not result.modified and fingerprint == step.signature[0]
    if not step.unchanged:
        _check_invariants(new, step.p.name)
        recompile(new)
        step.ctx.invalidate(new)


def _shapes(step: _Step) -> None:
    new, result = step.result.gm, step.result
    inputs = example_inputs_of(new) or step.ctx.example_inputs
    if not result.modified or inputs is None or step.unchanged:
        return
    # a pass that derived the new shapes itself (``shapes_current``) is trusted without
    # verification; with verification its shapes are checked against a real propagation
    if step.verify or not result.shapes_current:
        predicted = _recorded_shapes(new) if result.shapes_current else None
        try:
            outputs = propagate_shapes(new, inputs)
        except GraphselError as e:
            raise PassError(step.p.name, f"the rewritten graph no longer runs on the example inputs: {e}") from e
        if predicted is not None:
            _check_predicted_shapes(step.p.name, predicted, _recorded_shapes(new))
        step.new_signature = None                 # which nodes carry shapes may have changed
        verify_inputs = step.ctx.verify_inputs() if step.verify else []
        if verify_inputs and _same_inputs(inputs, verify_inputs[0]) and not has_masks(new):
            # eval mode, no grad, no masks: exactly what reference_forward computes
            step.propagated = [t.detach() for t in flatten_outputs(outputs)]


def _verify(step: _Step, rtol: float | None, atol: float | None) -> None:
    t0 = time.perf_counter()
    ctx, p, new = step.ctx, step.p, step.result.gm
    if step.verify and ctx.verify_inputs() and p.contract is Contract.STRUCTURAL:
        before, after = _output_shapes(step.before), _output_shapes(new)
        if before is None or after is None:            # shapes not recorded: run the new graph
            before = [[tuple(t.shape) for t in r] for r in step.reference] if step.reference else None
            step.new_reference = [reference_forward(new, x, ctx) for x in ctx.verify_inputs()]
            after = [tuple(t.shape) for t in step.new_reference[0]]
            before = before[0] if before else after
        if before != after:
            raise FunctionChangedError(p.name, str(p.contract), math.inf, math.inf, 0.0, None,
                                       f"the outputs changed shape from {before} to {after}")
        step.checked = True
    elif step.verify and ctx.verify_inputs():
        if step.reference is not None and _same_computation(step):
            step.new_reference = step.reference       # the same code on the same tensors and plan
        else:
            step.new_reference = [step.propagated if i == 0 and step.propagated is not None
                                  else reference_forward(new, x, ctx) for i, x in enumerate(ctx.verify_inputs())]
        dev = compare_outputs(step.reference, step.new_reference, rtol, atol)
        contract = p.contract
        if contract is Contract.EXACT:
            violated = not dev.ok
        elif contract is Contract.APPROXIMATE and step.result.bound is not None:
            violated = not dev.shapes_match or dev.max_abs > step.result.bound + dev.tolerance
        else:
            violated = not dev.shapes_match
        if violated:
            node, detail = first_divergence(step.before, new, ctx.verify_inputs()[0], rtol, atol, ctx)
            tol = dev.tolerance if contract is Contract.EXACT else (step.result.bound or 0.0) + dev.tolerance
            raise FunctionChangedError(p.name, str(contract), dev.max_abs, dev.max_rel, tol, node,
                                       detail or dev.detail)
        step.deviation = dev
        step.checked = True
    step.verify_seconds = time.perf_counter() - t0


SNAPSHOT_BYTES = 1 << 30      # graphs with more parameter and buffer memory run the forwards instead


def _snapshot(index: dict[str, nn.Module]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Every parameter and buffer with a copy of its values (None above ``SNAPSHOT_BYTES``)."""
    tensors = [t for *_, t in module_tensors(index)]
    if sum(t.numel() * t.element_size() for t in tensors) > SNAPSHOT_BYTES:
        return None
    return [(t, t.detach().clone()) for t in tensors]


def _same_inputs(a: tuple, b: tuple) -> bool:
    """The same input values (graph copies carry copies of the example inputs)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x is y:
            continue
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
                and x.dtype == y.dtype and x.device == y.device and torch.equal(x, y)):
            return False
    return True


def _same_computation(step: _Step) -> bool:
    """Whether the pass's graph computes, by construction, what the previous one did under
    reference semantics: the graph is unchanged (fingerprint, shapes, module settings), every
    parameter and buffer is the same tensor object holding the same values as before the pass,
    and the masks — if any — give the mask oracle the same plan (which tensors are zeroed, which
    reductions and consumers see kept channels)."""
    new, before = step.result.gm, step.before
    if not step.unchanged or new is not step.work or before is new or step.snapshot is None:
        return False
    ta = [t for *_, t in module_tensors(module_index(new))]
    if len(ta) != len(step.snapshot) or any(t is not old or not torch.equal(t, copy_)
                                            for t, (old, copy_) in zip(ta, step.snapshot)):
        return False            # (values compared too: a write through ``.data`` bumps no version counter)
    mb, ma = has_masks(before), has_masks(new)
    if not mb and not ma:
        return True
    if mb != ma:
        return False
    pb = step.ctx.analysis("oracle_plan", before, key=get_masks(before).key())
    pa = step.ctx.analysis("oracle_plan", new, key=get_masks(new).key())
    return _plans_equal(pb, pa)


def _plans_equal(a, b) -> bool:
    for x, y in ((a.zero, b.zero), (a.reduce, b.reduce), (a.consumer, b.consumer)):
        if x.keys() != y.keys():
            return False
        for k, vx in x.items():
            vy = y[k]
            if len(vx) != len(vy) or any(
                    (not torch.equal(p, q)) if isinstance(p, torch.Tensor) else p != q for p, q in zip(vx, vy)):
                return False
    return True


def _output_shapes(gm: fx.GraphModule) -> list[tuple] | None:
    """The shapes of the graph's tensor outputs from its recorded ``tensor_meta`` (None when some
    output has none)."""
    out = next((n for n in gm.graph.nodes if n.op == "output"), None)
    if out is None:
        return None
    shapes = []
    for a in pytree_leaves(out.args[0]):
        if isinstance(a, fx.Node):
            tm = a.meta.get("tensor_meta")
            if tm is None or not hasattr(tm, "shape"):
                return None
            shapes.append(tuple(tm.shape))
    return shapes


def _record(step: _Step) -> PassRecord:
    p, result, dev = step.p, step.result, step.deviation
    new = result.gm
    names_after = {n.name for n in new.graph.nodes}
    params_after, macs_after = _cost_pair(new, step.ctx)
    record = PassRecord(
        name=p.name, contract=str(p.contract), options=_described(p.options), seconds=step.seconds,
        modified=result.modified,
        nodes_before=len(step.names_before), nodes_after=len(names_after),
        nodes_added=len(names_after - step.names_before), nodes_removed=len(step.names_before - names_after),
        params_before=step.cost_before[0], params_after=params_after, macs_before=step.cost_before[1],
        macs_after=macs_after, max_abs=dev.max_abs if dev else None, max_rel=dev.max_rel if dev else None,
        tolerance=(dev.tolerance if p.contract is Contract.EXACT else result.bound) if dev else None,
        verify_seconds=step.verify_seconds, verified=step.checked, stats=dict(result.stats),
        diagnostics=list(result.diagnostics))
    graphsel_meta(new).history.append(record)
    return record


def _described(options: dict[str, Any]) -> dict[str, Any]:
    """Options as the history keeps them: data, with functions and other objects by name (a
    history must survive saving, and must not hold the user's code)."""
    def describe(v):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (list, tuple)):
            return [describe(x) for x in v]
        if isinstance(v, dict):
            return {str(k): describe(x) for k, x in v.items()}
        if isinstance(v, type):
            return v.__qualname__
        return getattr(v, "__qualname__", None) or getattr(v, "__name__", None) or repr(v)
    return {k: describe(v) for k, v in options.items()}


def _check_invariants(gm: fx.GraphModule, pass_name: str) -> None:
    """Every module and attribute target resolves (checked first: clearer than lint's message),
    then ``graph.lint()`` (topological order, ownership)."""
    modules = module_index(gm)
    for n in gm.graph.nodes:
        if n.op == "call_module":
            if n.target not in modules:                # (an alias path is not in the index)
                try:
                    gm.get_submodule(n.target)
                except AttributeError:
                    raise PassError(pass_name, f"node '{n.name}' calls module '{n.target}', which does not exist") from None
        elif n.op == "get_attr":
            try:
                obj = gm
                for part in n.target.split("."):
                    obj = getattr(obj, part)
            except AttributeError:
                raise PassError(pass_name, f"node '{n.name}' reads attribute '{n.target}', which does not exist") from None
    try:
        gm.graph.lint()
    except Exception as e:  # noqa: BLE001
        raise PassError(pass_name, f"produced an invalid graph: {e}") from e


def _mode_of(model: nn.Module) -> bool | None:
    """True (all train), False (all eval) or None (mixed)."""
    flags = {m.training for m in module_index(model).values()}
    return flags.pop() if len(flags) == 1 else None


def _cost_pair(gm: fx.GraphModule, ctx: PassContext) -> tuple[int | None, int | None]:
    try:
        c = ctx.analysis("cost_totals", gm)
        return c.params, c.macs
    except Exception:  # noqa: BLE001 - cost is informative only
        return sum(p.numel() for p in gm.parameters()), None


def copy_for_pass(gm: fx.GraphModule, p: Pass) -> fx.GraphModule:
    """The copy a pass works on: graph, modules and metadata are copied; parameter and buffer
    tensors are shared (copy-on-write: passes replace tensors rather than editing them, which
    the pipeline checks with tensor version counters) unless the pass sets ``inplace_tensors``."""
    if p.inplace_tensors:
        return copy.deepcopy(gm)
    memo: dict[int, object] = {}
    for t in list(gm.parameters()) + list(gm.buffers()):
        memo[id(t)] = t
    return copy.deepcopy(gm, memo)


def _tensor_versions(index: dict[str, nn.Module]) -> dict[str, tuple[torch.Tensor, int]]:
    return {f"{path}.{name}" if path else name: (t, t._version) for path, _, name, t in module_tensors(index)}


def _shape_signature(gm: fx.GraphModule, fingerprint: int | None = None,
                     index: dict[str, nn.Module] | None = None) -> tuple:
    """What the propagated shapes depend on: the graph's structure (:func:`graph_fingerprint`;
    ``fingerprint``: the caller's, when it has it) and the shape, dtype and device of every
    parameter and buffer, the settings of every leaf module (its ``repr``: stride, padding, ...)
    and which nodes carry shapes. ``index``: ``module_index(gm)``, when the caller has it."""
    index = module_index(gm) if index is None else index
    tensors = tuple((path, name, t.shape, t.dtype, t.device) for path, _, name, t in module_tensors(index))
    modules = tuple(repr(m) for path, m in index.items() if path and not m._modules)
    shaped = frozenset(n.name for n in gm.graph.nodes if "tensor_meta" in n.meta)
    return graph_fingerprint(gm, index) if fingerprint is None else fingerprint, tensors, shaped, modules


def _recorded_shapes(gm: fx.GraphModule) -> dict[str, list[tuple]]:
    """Node name -> the (shape, dtype) of every tensor in its recorded ``tensor_meta``."""
    def leaves(tm) -> list[tuple]:
        if isinstance(tm, TensorMetadata):
            return [(tuple(tm.shape), tm.dtype)]
        if isinstance(tm, (tuple, list)):
            return [x for t in tm for x in leaves(t)]
        if isinstance(tm, dict):
            return [x for t in tm.values() for x in leaves(t)]
        return []
    return {n.name: leaves(n.meta["tensor_meta"]) for n in gm.graph.nodes if n.meta.get("tensor_meta") is not None}


def _check_predicted_shapes(pass_name: str, predicted: dict, actual: dict) -> None:
    for name, shapes in actual.items():
        if predicted.get(name) != shapes:
            raise PassError(pass_name, f"recorded shapes {predicted.get(name)} for node '{name}', but running the "
                                       f"rewritten graph gives {shapes} (its PassResult says shapes_current=True)")


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector (restoring its previous state): graph copies allocate
    hundreds of thousands of objects, and one full collection over a large model's heap costs as
    much as the channel analysis (0.4 s of densenet201's 1.8 s). Reference counting still frees
    almost everything; the collector resumes, and runs when due, afterwards."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@_gc_paused()
def transform(model: nn.Module, passes: Any, example_inputs: Any = None, *, verify: bool = True,
              leaf_modules: Sequence[type | str] = (), concrete_args: dict[str, Any] | None = None,
              seed: int = 0, n_random_inputs: int = 2, rtol: float | None = None, atol: float | None = None,
              progress: bool | None = None, check_finite: bool = True) -> fx.GraphModule:
    """Trace ``model`` (unless it is a graphsel GraphModule) and run ``passes`` over it.

    ``passes``: Pass objects, registered names, ``(name, {options})`` pairs, or one
    comma-separated string. ``verify``: check every pass's contract (see the module docstring).
    Verification refuses what it cannot judge — weights, buffers, example inputs or model outputs
    that are not finite (a comparison with NaN holds vacuously) — with a :class:`GraphselError`
    naming the tensor; ``check_finite=False`` skips that check. Returns a GraphModule carrying its
    pass history (:func:`graphsel.report` renders it), in the training mode of ``model`` when that
    mode was uniform.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"graphsel.transform expects a torch.nn.Module, got {type(model).__name__}")
    pipeline = resolve_passes(passes)
    if verify:
        _check_device(model, example_inputs)
        if check_finite:
            _check_finite(model, example_inputs)
    mode = _mode_of(model)
    shared: set[int] = set()
    if isinstance(model, fx.GraphModule) and graphsel_meta(model, create=False) is not None:
        gm = copy.deepcopy(model)
        if example_inputs is not None:
            inputs = as_tuple(example_inputs)
            propagate_shapes(gm, inputs)
            gm.meta["graphsel_example_inputs"] = inputs
    else:
        gm = trace(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args,
                   share_parameters=not verify)
        if not verify:
            shared = _storages(model.parameters())
    ctx = PassContext(example_inputs_of(gm), n_random_inputs=n_random_inputs, seed=seed)
    ctx.check_finite = verify and check_finite
    ctx.invalidate(gm)                         # nothing cached for a graph handed in from outside applies
    reference = None
    bar = tqdm(pipeline, desc="graphsel", unit="pass", disable=(not progress) if progress is not None else None,
               leave=False)
    signature = None
    for p in bar:
        bar.set_postfix_str(p.name)
        gm, _, reference, signature = run_pass(p, gm, ctx, verify=verify, reference=reference, rtol=rtol,
                                               atol=atol, signature=signature)
    if shared:
        unshare_parameters(gm, shared)
    if mode is not None:
        gm.train(mode)
    return gm


def _check_device(model: nn.Module, example_inputs: Any) -> None:
    """Verification runs the model: tensors on the meta device (no data) cannot be verified. Without
    verification, passes that only analyse and rewrite the graph work on meta models (a cheap way to
    search a zoo for patterns); a pass that needs data then fails with a PassError naming it."""
    named = list(module_tensors_of(model)) + [(f"example input {i}", t) for i, t in
                                              enumerate(as_tuple(example_inputs) or ()) if isinstance(t, torch.Tensor)]
    meta = next((name for name, t in named if t.device.type == "meta"), None)
    if meta is not None:
        raise GraphselError(f"'{meta}' is on the meta device (shapes without data): verification runs the model, "
                            f"so it needs real tensors (CPU or CUDA). For the costs of a meta model use "
                            f"graphsel.cost(model, example_inputs); passes that only analyse the graph run on it with "
                            f"verify=False.")


def module_tensors_of(model: nn.Module):
    """(qualified name, tensor) for every parameter and buffer of ``model``."""
    for path, _, name, t in module_tensors(module_index(model)):
        yield (f"{path}.{name}" if path else name), t


def _check_finite(model: nn.Module, example_inputs: Any) -> None:
    for i, t in enumerate(as_tuple(example_inputs) or ()):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise GraphselError(f"example input {i} holds {int((~torch.isfinite(t)).sum())} non-finite value(s): "
                                f"verification cannot judge outputs computed from it. Pass finite example inputs "
                                f"(or check_finite=False to skip this check).")
    for name, t in module_tensors_of(model):
        if t.is_floating_point() and t.numel() and not _all_finite(t):
            raise GraphselError(f"'{name}' holds {int((~torch.isfinite(t)).sum())} NaN or infinite value(s): "
                                f"verification cannot judge a model whose weights are not finite (every comparison "
                                f"with NaN holds), and criteria such as L1 would rank on them. Fix the weights (or "
                                f"pass check_finite=False to skip this check).")


def _all_finite(t: torch.Tensor) -> bool:
    """One reduction instead of a boolean tensor as large as ``t``: min and max propagate NaN,
    and are finite exactly when every element is."""
    lo, hi = torch.aminmax(t.detach())
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _check_finite_outputs(reference: list[list[torch.Tensor]]) -> None:
    for r in reference:
        for i, t in enumerate(r):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise GraphselError(f"the model's output {i} is not finite on the verification inputs before any "
                                    f"pass ran ({int((~torch.isfinite(t)).sum())} NaN/inf values): verification "
                                    f"cannot judge it. Check the model and its inputs (or pass check_finite=False).")


def _storages(tensors) -> set[int]:
    return {p for t in tensors if (p := t.untyped_storage().data_ptr())}


def unshare_parameters(gm: nn.Module, theirs: set[int]) -> int:
    """Replace every parameter and buffer of ``gm`` whose memory lies in one of the storages
    ``theirs`` (the user's tensors: the same Parameter objects, or views a pass made of them) with
    a clone; tensors that were one object stay one object (tied weights stay tied). Returns how
    many tensors were cloned."""
    clones: dict[int, torch.Tensor] = {}
    for _, registry, name, t in list(module_tensors(module_index(gm))):
        if t.untyped_storage().data_ptr() not in theirs:
            continue
        if id(t) not in clones:
            copy_ = t.detach().clone()
            clones[id(t)] = nn.Parameter(copy_, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else copy_
        registry[name] = clones[id(t)]
    return len(clones)
