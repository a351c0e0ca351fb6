"""BSNExtract (``bsn_extract``): the static network a gated super network has learned.

Contract: **exact** with respect to the gated model in eval mode (the pipeline verifies it):

1. the eval architecture: every gate at ``σ(logit) > 0.5``; the nodes it keeps are those on an
   input → output path whose gates are on (:meth:`.edges.GateGraph.kept`) — a gated-off edge and
   every node it disconnects are exactly zero in the gated forward (:mod:`.gate`), so they can go;
2. a sum that loses an operand (``s + 0·F(x)``) becomes its other operand — the residual branch,
   or the fabric connection, disappears with its parameters (a projection shortcut stays: it is
   the shortcut, not the branch);
3. any other reader of a removed node gets its value as a constant: zeros of the batch's size,
   or — for a node that computes a non-zero constant from disconnected inputs (a BatchNorm shift
   behind a gate that is off, read by an ungated edge) — the per-sample value stored as a buffer,
   with a warning naming it;
4. gates that are on are removed (identity in eval) unless ``keep_gates=True`` (to go on
   training the sub-network's gates), then dead code and unused modules are deleted.

Channel counts never change (removed branches are addends of element-wise sums; constants keep
their shapes), so no ``materialize`` is needed after it; masks a graph already carries stay for
``fold_masks`` / ``materialize``. An eval architecture without any input → output path (every path
crosses a gate that is off) is an error.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from graphsel.errors import GraphselError
from graphsel.ir.graph import delete_unused_modules, module_index, unique_module_path
from graphsel.ir.meta import graphsel_meta
from graphsel.ir.shapes import tensor_shape
from graphsel.ir.tracing import example_inputs_of
from graphsel.pipeline.passbase import Contract, Diagnostic, Pass, PassResult
from graphsel.pipeline.registry import register_pass
from graphsel.pipeline.verify import eval_mode

from .edges import GateGraph, is_add, is_inplace


def _capture(gm: fx.GraphModule, names: set[str], inputs: tuple) -> dict[str, Any]:
    got: dict[str, Any] = {}

    class _Capture(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in names:
                got[n.name] = out.detach().clone() if isinstance(out, torch.Tensor) else out
            return out

    with torch.no_grad(), eval_mode(gm):
        _Capture(gm).run(*inputs)
    return got


def _data_reaches_output(gg: GateGraph, H) -> bool:
    """Whether some placeholder reaches the output along edges whose gates are on."""
    nodes, inputs, column = gg.nodes, gg.index.inputs, gg.column
    on = H[0]
    data = [False] * len(nodes)
    for i, n in enumerate(nodes):
        if n.op == "placeholder":
            data[i] = True
        elif column[i] >= 0:
            data[i] = data[inputs[i][0]] and bool(on[column[i]])
        else:
            data[i] = any(data[j] for j in inputs[i])
    return data[gg.output]


@register_pass
class BSNExtract(Pass):
    """Remove the edges whose gates are off and what they disconnect (see the module docstring)."""

    name = "bsn_extract"
    contract = Contract.EXACT

    def __init__(self, keep_gates: bool = False):
        if not isinstance(keep_gates, bool):
            raise TypeError(f"bsn_extract: keep_gates must be a bool, got {keep_gates!r}")
        super().__init__(keep_gates=keep_gates)

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        gg = GateGraph(gm)
        diags: list[Diagnostic] = []
        if gg.n_gates == 0:
            diags.append(Diagnostic("no-op: the graph has no budget gates (run budget_gates first)", level="info"))
            return PassResult(gm, modified=False, stats={"gates": 0}, diagnostics=diags)
        H = gg.eval_values()
        if not _data_reaches_output(gg, H):
            off = [name for name, on in zip(gg.gate_names, H[0]) if not on]
            raise GraphselError(f"bsn_extract: the eval architecture has no input → output path: every path "
                                f"crosses a gate that is off ({len(off)} off: {', '.join(off[:6])}"
                                f"{' ...' if len(off) > 6 else ''}); its output would not depend on the input")
        kept = gg.kept(H)[:, 0]
        nodes = gg.nodes
        pos = {n: i for i, n in enumerate(nodes)}
        modules = module_index(gm)
        params_before = sum(p.numel() for p in gm.parameters())
        is_gate = gg.column >= 0

        # readers that stay and read a node that goes
        pairs = [(v, u) for v in nodes if kept[pos[v]] or v.op == "output"
                 for u in v.all_input_nodes if not kept[pos[u]]]
        off_gates = {nodes[i] for i in gg.gate_nodes if not kept[i]}
        to_capture = {u.name for _, u in pairs if u not in off_gates}
        values: dict[str, Any] = {}
        if to_capture:
            inputs = example_inputs_of(gm) or ctx.example_inputs
            if inputs is None:
                raise GraphselError("bsn_extract needs example inputs to fold disconnected nodes into constants")
            values = _capture(gm, to_capture, tuple(inputs))

        def zero(u: fx.Node) -> bool:
            if u in off_gates:
                return True
            val = values.get(u.name)
            return isinstance(val, torch.Tensor) and not bool(val.count_nonzero())

        def staying(w: fx.Node) -> bool:
            i = pos.get(w)
            return i is None or (kept[i] and w not in replaced and not (is_gate[i] and not self.keep_gates))

        graph = gm.graph
        placeholder = next((n for n in nodes if n.op == "placeholder" and tensor_shape(n)), None)
        replaced: dict[fx.Node, fx.Node] = {}
        constants = folded = 0
        # 1. the gates that stay on: identity in eval
        if not self.keep_gates:
            for i in gg.gate_nodes:
                g = nodes[i]
                if kept[i]:
                    g.replace_all_uses_with(g.args[0])
        # 2. sums lose their removed operands; other readers get constants
        for v, u in pairs:
            if v.op != "output" and is_add(v) and zero(u) and v not in replaced:
                other = v.args[1] if v.args[0] is u else v.args[0]
                other = _resolve(other, replaced)
                if tensor_shape(other) is not None and tuple(tensor_shape(other)) == tuple(tensor_shape(v) or ()):
                    target = other
                    others = [w for w in other.users if w is not v and staying(w)]
                    if others and any(is_inplace(w, modules) for w in v.users):
                        with graph.inserting_after(v):
                            target = graph.call_method("clone", (other,))
                        target.meta.update({k: x for k, x in v.meta.items() if k in ("tensor_meta", "type")})
                    v.replace_all_uses_with(target)
                    replaced[v] = target
                    folded += 1
                    continue
            const = self._constant(gm, v, u, values, placeholder, zero(u), diags)
            v.replace_input_with(u, const)
            constants += 1
        # 3. everything not kept goes (readers of it were rewired above)
        removed = 0
        erase = [n for n in reversed(nodes) if (not kept[pos[n]] or n in replaced
                                                or (is_gate[pos[n]] and not self.keep_gates))
                 and n.op not in ("placeholder", "output")]
        for n in erase:
            if n.users:
                raise GraphselError(f"bsn_extract: internal error, node '{n.name}' goes but "
                                    f"'{next(iter(n.users)).name}' still reads it")
            graph.erase_node(n)
            removed += 1
        delete_unused_modules(gm)
        _delete_unused_tensors(gm)
        graph.lint()
        if self.keep_gates:
            GateGraph(gm).wire()
        gm.recompile()
        off = [name for name, on in zip(gg.gate_names, H[0]) if not on]
        disconnected = [gg.gate_names[c] for c, i in enumerate(gg.gate_nodes) if H[0][c] and not kept[i]]
        params_after = sum(p.numel() for p in gm.parameters())
        for name in off:
            diags.append(Diagnostic("gate off: its edge was removed", name, level="info"))
        for name in disconnected:
            diags.append(Diagnostic("gate on but its edge is disconnected by gates that are off: removed", name,
                                    level="info"))
        graphsel_meta(gm).state[self.name] = {"off": off, "disconnected": disconnected,
                                              "kept": [n for n, on in zip(gg.gate_names, H[0]) if on
                                                       and n not in disconnected]}
        return PassResult(gm, modified=True, stats={
            "gates": gg.n_gates, "off": len(off), "disconnected": len(disconnected),
            "nodes_removed": removed, "sums_folded": folded, "constants": constants,
            "params_removed": params_before - params_after}, diagnostics=diags)

    def _constant(self, gm: fx.GraphModule, v: fx.Node, u: fx.Node, values: dict, placeholder: fx.Node | None,
                  is_zero: bool, diags: list[Diagnostic]) -> fx.Node:
        """A node computing the (input-independent) value of removed node ``u`` for reader ``v``."""
        graph = gm.graph
        shape = tensor_shape(u)
        tm = u.meta.get("tensor_meta")
        if shape is None or tm is None:
            raise GraphselError(f"bsn_extract: '{v.name}' reads '{u.name}', which is removed and has no recorded "
                                f"tensor shape; cannot replace it by a constant")
        batch = tensor_shape(placeholder)[0] if placeholder is not None else None
        per_sample = placeholder is not None and len(shape) >= 1 and shape[0] == batch
        with graph.inserting_before(v):
            n = graph.call_method("size", (placeholder, 0)) if per_sample else None
            if is_zero:
                dev = graph.call_function(getattr, (placeholder, "device")) if placeholder is not None else None
                size = (n, *shape[1:]) if per_sample else tuple(shape)
                const = graph.call_function(torch.zeros, (size,), {"dtype": tm.dtype, **({"device": dev} if dev else {})})
            else:
                val = values[u.name]
                if per_sample and not bool((val == val[:1]).all()):
                    raise GraphselError(f"bsn_extract: node '{u.name}' is disconnected from the inputs but its "
                                        f"value differs between samples; cannot fold it into a constant")
                name = unique_module_path(gm, f"bsn_const_{u.name}")
                gm.register_buffer(name, (val[:1] if per_sample else val).clone())
                attr = graph.get_attr(name)
                const = graph.call_method("clone", (graph.call_method("expand", (attr, n, *shape[1:])),)) \
                    if per_sample else graph.call_method("clone", (attr,))
                diags.append(Diagnostic(f"'{u.name}' is disconnected from the inputs but computes a non-zero "
                                        f"constant that '{v.name}' reads (an ungated edge behind gates that are "
                                        f"off); kept as the buffer '{name}'", u.name, level="warning"))
        const.meta["tensor_meta"] = tm
        return const


def _delete_unused_tensors(gm: fx.GraphModule) -> None:
    """Delete the parameters and buffers no node reads: those a traced-through module holds
    itself (a layer-scale ``gamma`` read with ``get_attr``) stay with the module when another of
    its children is still called (an ``nn.Identity`` shortcut), after the branch reading them went."""
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    called = tuple(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    inside = tuple(c + "." for c in called)
    for path, m in module_index(gm).items():
        if path in called or path.startswith(inside):
            continue                                 # a leaf (or inside one): its forward reads them
        for name in list(m._parameters) + list(m._buffers):
            if (f"{path}.{name}" if path else name) not in read:
                delattr(m, name)


def _resolve(n: fx.Node, replaced: dict[fx.Node, fx.Node]) -> fx.Node:
    while n in replaced:
        n = replaced[n]
    return n
