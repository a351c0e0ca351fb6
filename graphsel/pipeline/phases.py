"""``graphsel.transform``: trace, run passes on copies, check each result, verify each contract.

For each pass: copy the current graph (tensors shared copy-on-write), run the pass,
``graph.lint()``, check that every module and attribute target resolves, recompile and
re-propagate shapes when the graph, a tensor shape or a module setting changed,
verify the contract against the previous graph (eval mode; example inputs plus random inputs;
dtype tolerances), and record a row of the pass history. A failing pass raises
:class:`~graphsel.PassError` or :class:`~graphsel.FunctionChangedError`; the user's model is never
touched (tracing works on a deep copy).

``verify=False`` is the fast path for trusted passes: nothing compares against the previous
graph, so passes edit the pipeline's graph directly (no per-pass copies), and the traced copy
holds the user's own Parameter objects (buffers are copied) until the end, when every parameter
or buffer whose memory is one of the user's parameters (the same object, or a view a pass made
of it) is cloned — the returned module never aliases the user's. Passes replace tensors
rather than write into them (the version-counter check still runs and raises), and a pass that
declares ``inplace_tensors`` gets a deep copy first; a pass's ``modified=False`` is taken at its
word while the graph's fingerprint agrees (no shape signature, no re-check of leaf-module
settings); a third-party pass that writes into a
parameter without declaring it is reported, but only after the write (and a write through
``.data``, whose version counter is separate, not at all): use the default ``verify=True`` for
untrusted passes.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import time
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import TensorMetadata
from tqdm.auto import tqdm

from graphsel.pipeline.context import PassContext, graph_fingerprint
from graphsel.errors import FunctionChangedError, GraphselError, PassError
from graphsel.ir.meta import PassRecord, graphsel_meta
from graphsel.pipeline.passbase import Contract, Pass, PassResult
from graphsel.ir.graph import COMPILED_KEY, module_index, module_tensors, recompile
from graphsel.pipeline.registry import resolve_passes
from graphsel.ir.shapes import propagate_shapes
from graphsel.ir.tracing import example_inputs_of, trace
from graphsel.pipeline.verify import Deviation, compare_outputs, first_divergence, reference_forward


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


def _cost_pair(gm: fx.GraphModule, ctx: PassContext, fingerprint: int | None = None) -> tuple[int | None, int | None]:
    try:
        c = ctx.analysis("cost_totals", gm, fingerprint=fingerprint)
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


def _tensor_versions(gm: fx.GraphModule, index: dict[str, nn.Module]) -> dict[str, tuple[torch.Tensor, int]]:
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


def run_pass(p: Pass, gm: fx.GraphModule, ctx: PassContext, *, verify: bool = True,
             reference: list[list[torch.Tensor]] | None = None, rtol: float | None = None,
             atol: float | None = None, signature: tuple | None = None
             ) -> tuple[fx.GraphModule, PassRecord, list[list[torch.Tensor]] | None, tuple]:
    """Run one pass on a copy of ``gm`` with all checks; returns (new gm, history row, new
    reference outputs, the new gm's shape signature or None when it was not needed). ``signature``:
    ``gm``'s, when the caller has it from the previous pass (nothing touched ``gm`` since).

    Whether a pass changed the graph (and so needs checking, new code and new shapes): with
    verification, its result's full shape signature is compared with the input's; without, the
    pass is trusted as the rest of that mode trusts it — a result it reports unmodified, with an
    unchanged graph fingerprint, is unchanged (the "signature" is then the fingerprint alone)."""
    if verify and reference is None and ctx.verify_inputs():
        reference = [reference_forward(gm, x) for x in ctx.verify_inputs()]
    # Without verification nothing reads the previous graph again: the pass edits ``gm`` itself
    # (the pipeline's own modules; tensors a pass may edit in place are still copied first).
    in_place = not verify and not p.inplace_tensors
    work = gm if in_place else copy_for_pass(gm, p)
    index = module_index(gm)
    if signature is None:
        signature = (_shape_signature(work, index=index if work is gm else None) if verify
                     else (graph_fingerprint(gm, index),))
    versions = {} if p.inplace_tensors else _tensor_versions(gm, index)
    names_before = {n.name for n in gm.graph.nodes}
    params_before, macs_before = _cost_pair(gm, ctx, signature[0])
    t0 = time.perf_counter()
    try:
        result = p(work, ctx)
    except GraphselError:
        raise
    except Exception as e:  # noqa: BLE001
        raise PassError(p.name, f"failed with {type(e).__name__}: {e}") from e
    seconds = time.perf_counter() - t0
    changed = [name for name, (t, v) in versions.items() if t._version != v]
    if changed:
        raise PassError(p.name, f"modified tensor '{changed[0]}' in place ({len(changed)} tensor(s)); passes share "
                                f"tensors with the previous graph and must replace them (copy-on-write), or set "
                                f"`inplace_tensors = True` on the pass class to get a deep copy")
    if not isinstance(result, PassResult):
        raise PassError(p.name, f"returned {type(result).__name__}, not a graphsel.PassResult")
    new = result.gm
    if not isinstance(new, fx.GraphModule):
        raise PassError(p.name, f"PassResult.gm is a {type(new).__name__}, not a torch.fx.GraphModule")
    new.meta.setdefault("graphsel", graphsel_meta(work))
    # a pass that changed only metadata (masks) keeps the graph (valid before), the code and the
    # shapes its copy carries: checking, recompiling and re-running the model are skipped
    # (the full signature only when the graph's fingerprint leaves the question open)
    new_index = module_index(new)
    new_fingerprint = graph_fingerprint(new, new_index)
    if verify:
        new_signature = (_shape_signature(new, new_fingerprint, new_index)
                         if new is work and new_fingerprint == signature[0] else None)
        unchanged = new_signature == signature
    else:
        new_signature = (new_fingerprint,)
        unchanged = new is work and not result.modified and new_fingerprint == signature[0]
    if not unchanged:
        _check_invariants(new, p.name)
        if new.meta.get(COMPILED_KEY) != new_fingerprint:
            recompile(new, new_fingerprint)
    inputs = example_inputs_of(new) or ctx.example_inputs
    if result.modified and inputs is not None and not unchanged:
        # a pass that derived the new shapes itself (``shapes_current``) is trusted without
        # verification; with verification its shapes are checked against a real propagation
        if verify or not result.shapes_current:
            predicted = _recorded_shapes(new) if result.shapes_current else None
            try:
                propagate_shapes(new, inputs)
            except GraphselError as e:
                raise PassError(p.name, f"the rewritten graph no longer runs on the example inputs: {e}") from e
            if predicted is not None:
                _check_predicted_shapes(p.name, predicted, _recorded_shapes(new))
            new_signature = None                 # which nodes carry shapes may have changed
    names_after = {n.name for n in new.graph.nodes}
    params_after, macs_after = _cost_pair(new, ctx, new_fingerprint)

    dev: Deviation | None = None
    vt0 = time.perf_counter()
    new_reference = None
    if verify and ctx.verify_inputs():
        new_reference = [reference_forward(new, x) for x in ctx.verify_inputs()]
        dev = compare_outputs(reference, new_reference, rtol, atol)
        contract = p.contract
        violated = False
        if contract is Contract.EXACT:
            violated = not dev.ok
        elif contract is Contract.APPROXIMATE and result.bound is not None:
            violated = not dev.shapes_match or dev.max_abs > result.bound + dev.tolerance
        elif not dev.shapes_match:
            violated = True
        if violated:
            node, detail = first_divergence(gm, new, ctx.verify_inputs()[0], rtol, atol)
            tol = dev.tolerance if contract is Contract.EXACT else (result.bound or 0.0) + dev.tolerance
            raise FunctionChangedError(p.name, str(contract), dev.max_abs, dev.max_rel, tol, node,
                                       detail or dev.detail)
    record = PassRecord(
        name=p.name, contract=str(p.contract), options=p.options, seconds=seconds, modified=result.modified,
        nodes_before=len(names_before), nodes_after=len(names_after),
        nodes_added=len(names_after - names_before), nodes_removed=len(names_before - names_after),
        params_before=params_before, params_after=params_after, macs_before=macs_before, macs_after=macs_after,
        max_abs=dev.max_abs if dev else None, max_rel=dev.max_rel if dev else None,
        tolerance=(dev.tolerance if p.contract is Contract.EXACT else result.bound) if dev else None,
        verify_seconds=time.perf_counter() - vt0, stats=dict(result.stats), diagnostics=list(result.diagnostics))
    graphsel_meta(new).history.append(record)
    return new, record, new_reference, new_signature


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
              progress: bool | None = None) -> fx.GraphModule:
    """Trace ``model`` (unless it is a graphsel GraphModule) and run ``passes`` over it.

    ``passes``: Pass objects, registered names, ``(name, {options})`` pairs, or one
    comma-separated string. ``verify``: check every pass's contract (see the module docstring).
    Returns a GraphModule carrying its pass history (:func:`graphsel.report` renders it), in the
    training mode of ``model`` when that mode was uniform.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"graphsel.transform expects a torch.nn.Module, got {type(model).__name__}")
    pipeline = resolve_passes(passes)
    mode = _mode_of(model)
    shared: set[int] = set()
    if isinstance(model, fx.GraphModule) and graphsel_meta(model, create=False) is not None:
        gm = copy.deepcopy(model)
        if example_inputs is not None:
            from graphsel.ir.tracing import _as_tuple
            inputs = _as_tuple(example_inputs)
            propagate_shapes(gm, inputs)
            gm.meta["graphsel_example_inputs"] = inputs
    else:
        gm = trace(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args,
                   share_parameters=not verify)
        if not verify:
            shared = _storages(model.parameters())
    ctx = PassContext(example_inputs_of(gm), n_random_inputs=n_random_inputs, seed=seed)
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
