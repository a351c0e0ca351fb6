"""graphsel.cost: every counted op against formulas derived here from the layer hyper-parameters,
parameter sharing, activation memory, extension rules, depth and distributed cost, bad input, and
the torchvision zoo against its published figures."""
from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import graphsel
from graphsel.analysis.cost import CostError, cost, distributed_cost, graph_cost, meta_model
from graphsel.ops import OpSpec, register_op


torch.manual_seed(0)


def conv_out(size: int, k: int, s: int, p: int, d: int = 1) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def rows_of_kind(report, kind: str):
    return [r for r in report.rows if r.kind == kind]


class Wrap(nn.Module):
    """A module whose forward is a given function of its submodules and one input."""

    def __init__(self, fn, **modules):
        super().__init__()
        self.fn = fn
        for k, v in modules.items():
            setattr(self, k, v)

    def forward(self, x):
        return self.fn(self, x)


class Wrap2(Wrap):
    def forward(self, x, y):
        return self.fn(self, x, y)


class Wrap3(Wrap):
    def forward(self, x, y, z):
        return self.fn(self, x, y, z)


# ------------------------------------------------------------------------------------------------
# convolution and linear

@settings(max_examples=25, deadline=None)
@given(groups=st.sampled_from([1, 2, 4]), a=st.integers(1, 3), b=st.integers(1, 3), k=st.integers(1, 5),
       s=st.integers(1, 3), p=st.integers(0, 2), d=st.integers(1, 2), h=st.integers(6, 12), w=st.integers(6, 12),
       n=st.integers(1, 2), bias=st.booleans())
def test_conv2d_macs_formula(groups, a, b, k, s, p, d, h, w, n, bias):
    cin, cout = groups * a, groups * b
    if h + 2 * p - d * (k - 1) - 1 < 0 or w + 2 * p - d * (k - 1) - 1 < 0:
        return
    conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=groups, bias=bias)
    report = cost(conv, torch.randn(n, cin, h, w))
    ho, wo = conv_out(h, k, s, p, d), conv_out(w, k, s, p, d)
    assert report.macs == n * cout * ho * wo * (cin // groups) * k * k
    assert report.params == cout * (cin // groups) * k * k + (cout if bias else 0)
    assert report.other_flops == (n * cout * ho * wo if bias else 0)
    assert report.rows_of("conv")[0].output_shape == (n, cout, ho, wo)


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_conv3d(dims):
    cin, cout, k, size, groups = 4, 6, 3, 7, 2
    conv = (nn.Conv1d if dims == 1 else nn.Conv3d)(cin, cout, k, padding=1, groups=groups, bias=False)
    report = cost(conv, torch.randn(2, cin, *(size,) * dims))
    assert report.macs == 2 * cout * size ** dims * (cin // groups) * k ** dims


@pytest.mark.parametrize("groups,stride,output_padding", [(1, 2, 1), (2, 2, 0), (4, 1, 0)])
def test_transposed_conv_macs(groups, stride, output_padding):
    """A transposed conv multiplies every input element by C_out/groups · k² weights."""
    cin, cout, k, h = 8, 4, 3, 5
    conv = nn.ConvTranspose2d(cin, cout, k, stride=stride, padding=1, output_padding=output_padding, groups=groups)
    report = cost(conv, torch.randn(1, cin, h, h))
    ho = (h - 1) * stride - 2 + (k - 1) + output_padding + 1
    assert report.rows[0].output_shape == (1, cout, ho, ho)
    assert report.macs == 1 * cin * h * h * (cout // groups) * k * k


def test_depthwise_conv():
    c, k, h = 16, 3, 10
    report = cost(nn.Conv2d(c, c, k, padding=1, groups=c, bias=False), torch.randn(1, c, h, h))
    assert report.macs == c * h * h * k * k


def test_functional_conv_and_linear_with_own_parameters():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 2, 3, 3))  # 8 outputs, 4 inputs in 2 groups
            self.fc_w = nn.Parameter(torch.randn(5, 8))
            self.fc_b = nn.Parameter(torch.randn(5))

        def forward(self, x):
            y = F.conv2d(x, self.w, stride=2, padding=1, groups=2)
            y = y.mean((2, 3))
            return F.linear(y, self.fc_w, self.fc_b)

    h = 9
    report = cost(Functional(), torch.randn(3, 4, h, h))
    ho = conv_out(h, 3, 2, 1)
    assert report.macs == 3 * 8 * ho * ho * 2 * 9 + 3 * 5 * 8
    assert report.params == 8 * 2 * 9 + 5 * 8 + 5
    assert report.unused_params == 0
    assert sum(r.params for r in report.rows) == report.params


def test_linear_on_token_sequence_and_bias():
    batch, tokens, fin, fout = 2, 7, 12, 5
    report = cost(nn.Linear(fin, fout), torch.randn(batch, tokens, fin))
    assert report.macs == batch * tokens * fin * fout
    assert report.other_flops == batch * tokens * fout  # the bias add


# ------------------------------------------------------------------------------------------------
# matmul family and attention

@pytest.mark.parametrize("spelling", ["operator", "torch.matmul", "method"])
def test_matmul_broadcast(spelling):
    fn = {"operator": lambda m, a, b: a @ b, "torch.matmul": lambda m, a, b: torch.matmul(a, b),
          "method": lambda m, a, b: a.matmul(b)}[spelling]
    b1, b2, n, k, m = 3, 2, 4, 5, 6
    report = cost(Wrap2(fn), (torch.randn(b1, 1, n, k), torch.randn(b2, k, m)))
    assert report.macs == b1 * b2 * n * k * m


def test_bmm_mm_addmm_baddbmm():
    b, n, k, m = 2, 3, 4, 5

    def f(mod, x, y, bias):
        return torch.bmm(x, y).sum() + torch.mm(x[0], y[0]).sum() + torch.addmm(bias[0], x[0], y[0]).sum() \
            + torch.baddbmm(bias, x, y).sum()
    report = cost(Wrap3(f), (torch.randn(b, n, k), torch.randn(b, k, m), torch.randn(b, n, m)))
    assert report.macs == b * n * k * m + n * k * m + n * k * m + b * n * k * m


@pytest.mark.parametrize("equation,shapes", [
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),
    ("B G H I D, B G H J D -> B G H I J", [(1, 2, 3, 4, 5), (1, 2, 3, 6, 5)]),
    ("ij,jk", [(3, 4), (4, 5)]),
    ("...ij,...jk->...ik", [(2, 3, 4), (2, 4, 5)]),
])
def test_einsum(equation, shapes):
    """Each output element sums over the contracted letter, the first operand's last dim here."""
    tensors = tuple(torch.randn(s) for s in shapes)
    report = cost(Wrap2(lambda m, a, b: torch.einsum(equation, a, b)), tensors)
    assert report.macs == torch.einsum(equation, *tensors).numel() * shapes[0][-1]


def test_scaled_dot_product_attention():
    b, h, lq, s, e, ev = 2, 3, 5, 7, 4, 6
    q, k, v = torch.randn(b, h, lq, e), torch.randn(b, h, s, e), torch.randn(b, h, s, ev)
    report = cost(Wrap3(lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v)), (q, k, v))
    assert report.macs == b * h * lq * s * e + b * h * lq * s * ev


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim,vdim", [(None, None), (6, 10)])
def test_multihead_attention(batch_first, kdim, vdim):
    e, heads, n, lq, lk = 8, 2, 3, 5, 4
    mha = nn.MultiheadAttention(e, heads, batch_first=batch_first, kdim=kdim, vdim=vdim)
    kd, vd = kdim or e, vdim or e

    def seq(length, dim):
        return torch.randn(n, length, dim) if batch_first else torch.randn(length, n, dim)
    report = cost(Wrap3(lambda m, q, k, v: m.mha(q, k, v, need_weights=False)[0], mha=mha),
                  (seq(lq, e), seq(lk, kd), seq(lk, vd)))
    projections = n * lq * e * e + n * lk * kd * e + n * lk * vd * e + n * lq * e * e
    attention = n * lq * lk * e * 2  # QKᵀ and AV, each summed over all heads
    assert report.macs == projections + attention
    assert report.params == sum(p.numel() for p in mha.parameters())


def test_transformer_encoder_layer_is_its_parts():
    e, heads, ff, n, length = 8, 2, 16, 2, 6
    layer = nn.TransformerEncoderLayer(e, heads, ff, batch_first=True)
    report = cost(layer, torch.randn(n, length, e))
    attn = 2 * n * length * e * e + 2 * n * length * e * e + 2 * n * length * length * e
    assert report.macs == attn + n * length * e * ff + n * length * ff * e


# ------------------------------------------------------------------------------------------------
# other FLOPs: norms, pooling, element-wise

def test_norms_pooling_elementwise_other_flops():
    c, h = 4, 8
    bn, ln, gn = nn.BatchNorm2d(c), nn.LayerNorm([c, h, h]), nn.GroupNorm(2, c)
    mp, ap, gap = nn.MaxPool2d(3, 2, 1), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1)

    def f(m, x):
        y = m.bn(x) + m.ln(x) + m.gn(x)   # two adds
        return m.mp(y).sum() + m.ap(y).sum() + m.gap(torch.relu(y)).sum()
    report = cost(Wrap(f, bn=bn, ln=ln, gn=gn, mp=mp, ap=ap, gap=gap), torch.randn(1, c, h, h))
    numel = c * h * h
    by_kind = {r.kind: r.other_flops for r in report.rows}
    assert by_kind["BatchNorm2d"] == 2 * numel
    assert by_kind["LayerNorm"] == 5 * numel and by_kind["GroupNorm"] == 5 * numel
    assert by_kind["MaxPool2d"] == c * conv_out(h, 3, 2, 1) ** 2 * 9
    assert by_kind["AvgPool2d"] == c * (h // 2) ** 2 * 4
    assert by_kind["AdaptiveAvgPool2d"] == numel
    assert by_kind["relu"] == numel
    # two full-size adds and two adds of 0-d sums
    assert sum(r.other_flops for r in rows_of_kind(report, "add")) == 2 * numel + 2
    assert report.macs == 0
    assert report.params == 2 * c + 2 * numel + 2 * c


# ------------------------------------------------------------------------------------------------
# parameters: sharing, tying, unused

def test_shared_module_counts_params_once_and_macs_twice():
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    report = cost(Wrap(lambda m, x: m.conv(m.conv(x)), conv=conv), torch.randn(1, 4, 6, 6))
    assert report.params == 4 * 4 * 9
    assert report.macs == 2 * (4 * 36 * 4 * 9)
    assert [r.params for r in report.rows_of("conv")] == [144, 0]


def test_tied_weights_count_once_and_unused_parameters_are_reported():
    a, b = nn.Linear(6, 6, bias=False), nn.Linear(6, 6, bias=False)
    b.weight = a.weight
    aux = nn.Linear(6, 3)
    report = cost(Wrap(lambda m, x: m.b(m.a(x)), a=a, b=b, aux=aux), torch.randn(2, 6))
    assert report.params == 36 + 6 * 3 + 3
    assert report.unused_params == 6 * 3 + 3
    assert report.macs == 2 * (2 * 6 * 6)


# ------------------------------------------------------------------------------------------------
# activation memory

def test_activation_bytes_and_peak():
    """conv1 → inplace ReLU → conv2: the ReLU allocates nothing; the input dies after conv1."""
    h, c0, c1, c2, f32 = 8, 3, 8, 4, 4
    model = nn.Sequential(nn.Conv2d(c0, c1, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(c1, c2, 1))
    report = cost(model, torch.randn(1, c0, h, h))
    x_bytes, y1, y2 = c0 * h * h * f32, c1 * h * h * f32, c2 * h * h * f32
    assert report.activation_bytes == y1 + y2
    assert rows_of_kind(report, "ReLU")[0].activation_bytes == 0
    assert report.peak_activation_bytes == max(x_bytes + y1, y1 + y2)


def test_views_do_not_allocate():
    report = cost(Wrap(lambda m, x: x.view(2, -1).transpose(0, 1)[1:] * 2), torch.randn(2, 3, 4))
    assert report.activation_bytes == 11 * 2 * 4  # only the multiplication's output


# ------------------------------------------------------------------------------------------------
# extension rules and unknown leaves

class Opaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(5, 5)

    def forward(self, x):
        return self.inner(x).relu()


class OpaqueChild(Opaque):
    pass


def _leaf_model():
    return Wrap(lambda m, x: m.b(m.a(x)), a=Opaque(), b=OpaqueChild())


def test_unknown_leaf_is_reported_not_silent():
    gm = graphsel.trace(_leaf_model(), (torch.randn(3, 5),), leaf_modules=[Opaque])
    report = graph_cost(gm)
    assert report.macs == 0
    assert report.params == 2 * 30
    assert [u.node for u in report.unknown] == ["a", "b"]
    assert "register_op" in report.unknown[0].reason
    assert "without a cost rule" in report.table() and "without a cost rule" in str(report)


def register_module_cost(cls, rule):
    register_op(cls, OpSpec("test_rule", cost=rule, category="module"))


def test_register_module_cost_extra_keys_and_most_specific_class(private_op_table):
    seen = []

    def base_rule(module, input_shapes, output_shape):
        seen.append((type(module).__name__, input_shapes, output_shape))
        dense = math.prod(output_shape) * module.inner.in_features
        return {"macs": dense // 2, "dense_macs": dense, "kept": 0.5}

    register_module_cost(Opaque, base_rule)
    gm = graphsel.trace(_leaf_model(), (torch.randn(3, 5),), leaf_modules=[Opaque])
    report = graph_cost(gm)
    assert seen == [("Opaque", [(3, 5)], (3, 5)), ("OpaqueChild", [(3, 5)], (3, 5))]
    assert report.macs == 2 * (3 * 5 * 5 // 2) and not report.unknown
    assert report.rows[0].extra == {"dense_macs": 75, "kept": 0.5}
    assert report.total("dense_macs") == 150
    table = report.table()
    assert "dense_macs" in table and "kept" in table

    register_module_cost(OpaqueChild, lambda m, ins, out: 7)   # the subclass's own rule wins
    report = graph_cost(gm)
    assert [r.macs for r in report.rows if r.node in ("a", "b")] == [37, 7]


def test_bad_rule_result_is_a_clear_error(private_op_table):
    register_module_cost(Opaque, lambda m, ins, out: "lots")
    gm = graphsel.trace(_leaf_model(), (torch.randn(3, 5),), leaf_modules=[Opaque])
    with pytest.raises(CostError, match="must return the MACs"):
        graph_cost(gm)


def scaled_copy(x, k: int):
    return x * k


torch.fx.wrap("scaled_copy")


class UsesWrapped(nn.Module):
    def forward(self, x):
        return scaled_copy(x, 3)


def test_register_function_cost_for_wrapped_function(private_op_table):
    x = torch.randn(2, 5)
    report = cost(UsesWrapped(), x)
    assert [u.node for u in report.unknown] == ["scaled_copy"] and report.macs == 0

    register_op(scaled_copy, OpSpec("scaled_copy", cost=lambda call: {"macs": call.out.numel * call.arg(1, "k"),
                                                                      "calls": 1}, category="module"))
    report = cost(UsesWrapped(), x)
    assert report.macs == x.numel() * 3 and not report.unknown
    assert report.rows[0].extra == {"calls": 1}

    register_op(scaled_copy, OpSpec("scaled_copy", cost=lambda call: None, category="module"))   # gives up
    report = cost(UsesWrapped(), x)
    assert [u.node for u in report.unknown] == ["scaled_copy"]
    assert "could not read" in report.unknown[0].reason
    with pytest.raises(TypeError, match="callable"):
        OpSpec("scaled_copy", cost="not callable")


def test_register_op_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_op(int, OpSpec("x"))
    with pytest.raises(TypeError, match="OpSpec"):
        register_op(Opaque, lambda *a: 0)
    with pytest.raises(ValueError, match="method name nor a dotted"):
        register_op("not a name", OpSpec("x"))


# ------------------------------------------------------------------------------------------------
# entry points, meta device, reports

def test_meta_device_equals_real_tensors():
    torchvision = pytest.importorskip("torchvision")
    real = cost(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    fake = cost(meta_model(torchvision.models.resnet18), torch.empty(1, 3, 64, 64, device="meta"))
    assert (real.params, real.macs, real.other_flops, real.activation_bytes, real.peak_activation_bytes) == \
        (fake.params, fake.macs, fake.other_flops, fake.activation_bytes, fake.peak_activation_bytes)


def test_meta_model_falls_back_for_constructors_that_compute_with_tensors():
    class Computes(nn.Module):
        def __init__(self):
            super().__init__()
            widths = (torch.arange(3) * 4 + 4).tolist()  # fails under torch.device("meta")
            self.convs = nn.Sequential(*[nn.Conv2d(w, w, 1) for w in widths])

    model = meta_model(Computes)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert [c.in_channels for c in model.convs] == [4, 8, 12]


def test_inferred_inputs_and_graphmodule_inputs():
    torchvision = pytest.importorskip("torchvision")
    model = meta_model(torchvision.models.resnet18)
    inferred = cost(model)
    assert inferred.input_shapes == [(1, 3, 224, 224)]
    assert inferred.macs == cost(model, torch.empty(1, 3, 224, 224, device="meta")).macs
    gm = graphsel.trace(model, torch.empty(1, 3, 224, 224, device="meta"))
    assert cost(gm).macs == inferred.macs
    small = cost(gm, torch.empty(1, 3, 112, 112, device="meta"))   # re-propagated
    assert small.input_shapes == [(1, 3, 112, 112)] and small.macs < inferred.macs


def test_report_table_and_by_module():
    from graphsel.tools.models import tiny_convnet
    report = cost(tiny_convnet(), torch.randn(1, 3, 32, 32))
    per_module = report.by_module(1)
    assert sum(v["macs"] for v in per_module.values()) == report.macs
    assert sum(v["params"] for v in per_module.values()) == report.params
    assert {"stem", "block", "down", "dense", "head"} <= set(per_module)
    top = report.table(top=3)
    assert top.count("\n") == 3 + 2 and "total" in top
    assert report.to_dict()["macs"] == report.macs
    with pytest.raises(ValueError):
        report.table(top=0)
    with pytest.raises(ValueError):
        report.by_module(0)


def test_pipeline_cost_analysis_uses_graph_cost():
    from graphsel.tools.models import tiny_convnet
    model = tiny_convnet().eval()
    x = torch.randn(1, 3, 32, 32)
    gm = graphsel.transform(model, ["fuse_bn"], (x,))
    history = graphsel.graphsel_meta(gm).history
    assert history[0].macs_before == cost(model, x).macs


# ------------------------------------------------------------------------------------------------
# depth and distributed cost

class NineModules(nn.Module):
    """A chain of 6 convs with 3 side convs (9 modules, depth 6)."""

    def __init__(self):
        super().__init__()
        self.chain = nn.ModuleList(nn.Conv2d(2, 2, 1) for _ in range(6))
        self.side = nn.ModuleList(nn.Conv2d(2, 2, 1) for _ in range(3))

    def forward(self, x):
        taps, y = [self.side[0](x)], x
        for i, conv in enumerate(self.chain):
            y = conv(y)
            if i in (1, 3):
                taps.append(self.side[len(taps)](y))
        return y + taps[0] + taps[1] + taps[2]


class TenModules(nn.Module):
    """Two parallel chains of 5 convs (10 modules, depth 5)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(*[nn.Conv2d(2, 2, 1) for _ in range(5)])
        self.b = nn.Sequential(*[nn.Conv2d(2, 2, 1) for _ in range(5)])

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_distributed_cost_paper_example():
    """BSN fig. 8: with n = 2 machines, a 9-module network can cost 6 steps and a 10-module one 5."""
    x = torch.randn(1, 2, 4, 4)
    nine, ten = cost(NineModules(), x), cost(TenModules(), x)
    assert len(nine.dag) == 9 and len(ten.dag) == 10
    assert (nine.depth, ten.depth) == (6, 5)
    assert distributed_cost(nine, 2) == 6
    assert distributed_cost(ten, 2) == 5
    assert (distributed_cost(nine, 1), distributed_cost(ten, 1)) == (9, 10)   # one unit: every module
    assert (distributed_cost(nine, 64), distributed_cost(ten, 64)) == (6, 5)  # unbounded: the depth
    gm = graphsel.trace(TenModules(), (x,))
    assert distributed_cost(gm, 2) == 5


def test_distributed_cost_is_greedy_in_topological_order():
    """p and q come first in topological order and take both units in step 1, delaying the chain
    r1 → r2 → r3: greedy costs 4 steps where 3 would do."""
    dag = {"p": [], "q": [], "r1": [], "r2": ["r1"], "r3": ["r2"]}
    assert distributed_cost(dag, 2) == 4
    assert distributed_cost(dag, 3) == 3


@pytest.mark.parametrize("dag,n,match", [
    ({"a": ["b"], "b": ["a"]}, 1, "cycle"),
    ({"a": ["zz"]}, 1, "not a node"),
    ({"a": []}, 0, "positive int"),
])
def test_distributed_cost_bad_input(dag, n, match):
    with pytest.raises(ValueError, match=match):
        distributed_cost(dag, n)
    with pytest.raises(TypeError):
        distributed_cost([1, 2], 1)


def test_dag_of_dense_concat():
    """In a dense block each layer's nearest layer predecessors are all earlier layers."""
    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.ModuleList(nn.Conv2d(2 + 2 * i, 2, 1) for i in range(3))

        def forward(self, x):
            for conv in self.c:
                x = torch.cat([x, conv(x)], 1)
            return x
    report = cost(Dense(), torch.randn(1, 2, 3, 3))
    assert report.dag == {"c_0": (), "c_1": ("c_0",), "c_2": ("c_0", "c_1")}
    assert report.depth == 3


# ------------------------------------------------------------------------------------------------
# bad input

def test_bad_inputs():
    with pytest.raises(TypeError, match="nn.Module"):
        cost("resnet18")
    with pytest.raises(TypeError, match="GraphModule"):
        graph_cost(nn.Linear(2, 2))
    plain = fx.symbolic_trace(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    with pytest.raises(CostError, match="no shape information"):
        graph_cost(plain)


def test_graph_edited_after_shape_propagation_names_the_node():
    gm = graphsel.trace(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), (torch.randn(2, 3),))
    last = [n for n in gm.graph.nodes if n.op == "call_module"][-1]
    with gm.graph.inserting_after(last):
        extra = gm.graph.call_function(torch.sigmoid, (last,))
    last.replace_all_uses_with(extra, delete_user_cb=lambda u: u is not extra)
    gm.recompile()
    with pytest.raises(CostError, match=f"node '{extra.name}'.*propagate_shapes"):
        graph_cost(gm)


# ------------------------------------------------------------------------------------------------
# the torchvision zoo

def _zoo_entries():
    try:
        import torchvision
        from torchvision.models import get_model_weights
    except ImportError:  # pragma: no cover - torchvision is a test dependency
        return []
    entries = []
    for name in torchvision.models.list_models(module=torchvision.models):
        weights = get_model_weights(name).DEFAULT
        if "_ops" in weights.meta and "num_params" in weights.meta:
            entries.append(name)
    return entries


def _zoo_model(name):
    """The model as its default weights' builder makes it, on the meta device, and the weights'
    evaluation input size (the transforms' centre crop)."""
    from torchvision.models import get_model, get_model_weights
    weights = get_model_weights(name).DEFAULT
    kwargs = {"num_classes": len(weights.meta["categories"])}
    size = weights.transforms().crop_size[0]
    if name.startswith("vit_"):
        kwargs["image_size"] = size              # the builder sets it from the weights (SWAG: 518)
    if name == "googlenet":
        kwargs.update(aux_logits=False, init_weights=False)  # the builder drops the aux heads
    if name == "inception_v3":
        kwargs["init_weights"] = False           # keeps AuxLogits (counted in num_params)
    return meta_model(get_model, name, **kwargs).eval(), size, weights.meta


@pytest.mark.zoo
@pytest.mark.parametrize("name", _zoo_entries())
def test_zoo_matches_torchvision_metadata(name):
    """Params and MACs within 1 % of ``num_params`` and ``_ops`` (GMACs printed with 3 decimals: a
    published 0.040 stands for anything in [0.0395, 0.0405), so the rounding is allowed too)."""
    model, size, meta = _zoo_model(name)
    report = cost(model, torch.empty(1, 3, size, size, device="meta"))
    assert not report.unknown, report.unknown
    assert abs(report.params / meta["num_params"] - 1) < 0.01, (report.params, meta["num_params"])
    gmacs = report.macs / 1e9
    assert abs(gmacs - meta["_ops"]) <= max(0.01 * meta["_ops"], 0.0005), (gmacs, meta["_ops"])


@pytest.mark.zoo
@pytest.mark.parametrize("name,leaf", [("swin_t", "ShiftedWindowAttention"),
                                       ("swin_v2_t", "ShiftedWindowAttentionV2"),
                                       ("maxvit_t", "RelativePositionalMultiHeadAttention")])
def test_torchvision_attention_leaves_cost_like_their_traced_bodies(name, leaf):
    import importlib
    model, size, _ = _zoo_model(name)
    module = importlib.import_module("torchvision.models." + ("maxvit" if "maxvit" in name else "swin_transformer"))
    x = torch.empty(1, 3, size, size, device="meta")
    traced = graph_cost(graphsel.trace(model, (x,)))
    leafed = graph_cost(graphsel.trace(model, (x,), leaf_modules=[getattr(module, leaf)]))
    assert any(r.kind == leaf for r in leafed.rows)
    assert leafed.macs == traced.macs and leafed.params == traced.params


def test_totals_only_cost_has_the_same_totals():
    import torchvision
    gm = graphsel.trace(torchvision.models.resnet18().eval(), (torch.randn(1, 3, 64, 64),))
    full, totals = graph_cost(gm), graph_cost(gm, totals_only=True)
    assert (totals.params, totals.macs, totals.other_flops, totals.unused_params) == \
        (full.params, full.macs, full.other_flops, full.unused_params)
    assert [(r.node, r.macs) for r in totals.rows] == [(r.node, r.macs) for r in full.rows]
    assert full.peak_activation_bytes > 0 and totals.peak_activation_bytes == 0
