"""Latency-aware pruning, latency tables and the runtime benchmark: behaviour only, never timings.

Deterministic fake timers stand in for the clock (a layer's "latency" is a function of its shape;
a model's is the sum over its conv/linear calls), so the allocator's choices can be checked
exactly; the real timers run once on tiny layers and nets to check they produce numbers.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import graphsel
from graphsel.analysis import latency as lat
from graphsel.analysis.latency import LatencyTable, LayerShape, grid_widths
from graphsel.errors import GraphselError
from graphsel.ir.meta import graphsel_meta
from graphsel.passes.prune_latency import parse_target_latency
from graphsel.tools.cli import main


# ------------------------------------------------------------------------------------------------
# fakes

def _model_timer(layer_timer):
    """A model's fake latency: the layer timer summed over its conv/linear calls (input shapes by hooks)."""
    def timer(model, inputs):
        shapes = []
        hooks = [m.register_forward_hook(lambda mod, args, out: shapes.append(LayerShape.of_module(mod, args[0].shape)))
                 for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
        try:
            with torch.no_grad():
                model.eval()(*inputs)
        finally:
            for h in hooks:
                h.remove()
        return sum(layer_timer(s) for s in shapes)
    return timer


def sixteen_fast(shape: LayerShape) -> float:
    """Work ∝ in × out × pixels; 3× slower per side whose width is not a multiple of 16."""
    pixels = int(np.prod(shape.input_shape[2:])) if shape.op == "conv" else 1
    work = shape.in_channels * shape.out_channels / shape.groups * pixels * 1e-4
    slow = (1 if shape.in_channels % 16 == 0 or shape.in_channels < 16 else 3) * \
           (1 if shape.out_channels % 16 == 0 or shape.out_channels < 16 else 3)
    return 0.01 + work * slow


def additive(shape: LayerShape) -> float:
    """One millisecond per channel, inputs and outputs alike (every channel costs the same)."""
    return float(shape.in_channels + shape.out_channels)


def _table(tmp_path, timer, runtime="eager", **kw):
    return LatencyTable(runtime, cache_dir=tmp_path / "cache", timer=timer, model_timer=_model_timer(timer),
                        progress=False, **kw)


class ThreeConvs(nn.Module):
    def __init__(self, c=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


X = torch.randn(1, 3, 8, 8)


def _kept(gm, path):
    return gm.get_submodule(path).out_channels


# ------------------------------------------------------------------------------------------------
# the allocator

def test_allocator_keeps_the_widths_the_table_says_are_fast(tmp_path):
    """With multiples of 16 three times faster, no pruned layer ends between them (the lower
    envelope of each group's latency curve), though the candidate grid has multiples of 8."""
    model = ThreeConvs(64)
    table = _table(tmp_path, sixteen_fast)
    gm = graphsel.transform(model, [("prune", {"target_latency": 0.5, "runtime": table}), "fold_masks", "materialize"],
                            (X,), verify=True)
    widths = [_kept(gm, p) for p in ("conv1", "conv2", "conv3")]
    assert any(w < 64 for w in widths), widths
    assert all(w % 16 == 0 for w in widths), widths
    assert 8 in grid_widths(64)                        # 8-steps were on offer
    stats = graphsel_meta(gm).history[0].stats["latency"]
    assert stats["measured_ms"] <= stats["target_ms"] * 1.1


def test_allocator_removes_the_least_important_per_millisecond(tmp_path):
    """Every channel costs the same; conv2's group has 32 nearly worthless channels: they go first,
    and they are exactly the lowest-scoring ones; the other groups are untouched."""
    model = ThreeConvs(64)
    low = np.arange(0, 64, 2)                           # the even channels of conv2 are worthless

    def scores(group, analysis, gm):
        s = np.ones(group.size)
        if "conv2" in group.sources:
            s[low] = 0.01
        return s

    dense = additive(LayerShape("conv", 3, 64, (1, 3, 8, 8))) + 2 * additive(LayerShape("conv", 64, 64, (1, 64, 8, 8))) \
        + additive(LayerShape("linear", 64, 10, (1, 64)))
    target = (dense - 2 * 32) / dense                  # exactly conv2's 32 worthless channels
    table = _table(tmp_path, additive)
    gm = graphsel.transform(model, [("prune", {"target_latency": target + 1e-6, "runtime": table,
                                               "criterion": scores})], (X,), verify=True)
    masks = graphsel_meta(gm).masks
    assert masks.removed == {"conv2": set(low.tolist())}
    stats = graphsel_meta(gm).history[0].stats["latency"]
    assert stats["target_met"] and abs(stats["measured_ms"] - stats["target_ms"]) <= 0.1 * stats["target_ms"]


@pytest.mark.parametrize("criterion", ["l1", "bn_gamma", "ecdm"])
def test_prune_to_a_latency_meets_it_in_its_own_measurement_and_verifies(tmp_path, criterion):
    model = ThreeConvs(128)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.1, 1.0)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    table = _table(tmp_path, additive)
    gm = graphsel.transform(model, [("prune", {"target_latency": 0.6, "runtime": table, "criterion": criterion}),
                                    "fold_masks", "materialize"], (X,), verify=True)
    rec = graphsel_meta(gm).history
    assert [r.verified for r in rec] == [True, True, True]
    stats = rec[0].stats["latency"]
    assert stats["target_met"], stats
    assert abs(stats["measured_ms"] - 0.6 * stats["dense_ms"]) <= 0.1 * 0.6 * stats["dense_ms"]
    # the slim model's own fake latency is what the pass measured
    assert _model_timer(additive)(gm, (X,)) == pytest.approx(stats["measured_ms"], rel=1e-6)
    assert stats["attempts"] and stats["table"]["path"].startswith(str(tmp_path))


def test_target_in_milliseconds_and_the_report(tmp_path):
    table = _table(tmp_path, additive)
    dense = _model_timer(additive)(ThreeConvs(64), (X,))
    gm = graphsel.transform(ThreeConvs(64), [("prune", {"target_latency": f"{0.7 * dense:.3f}ms", "runtime": table}),
                                             "fold_masks", "materialize"], (X,), verify=False)
    stats = graphsel_meta(gm).history[0].stats["latency"]
    assert stats["target_ms"] == pytest.approx(0.7 * dense, rel=1e-3)
    assert stats["measured_ms"] <= 1.1 * stats["target_ms"]
    assert "latency-aware on eager" in graphsel.report(gm)


def test_an_unreachable_target_is_reported_and_the_fastest_allocation_kept(tmp_path):
    """Every group keeps at least 1/8 of its channels and the model's output channels stay: with
    one millisecond per channel, 5 % of the dense latency cannot be reached."""
    table = _table(tmp_path, additive)
    gm = graphsel.transform(ThreeConvs(64), [("prune", {"target_latency": 0.05, "runtime": table}),
                                             "fold_masks", "materialize"], (X,), verify=False)
    rec = graphsel_meta(gm).history[0]
    stats = rec.stats["latency"]
    assert not stats["target_met"] and stats["measured_ms"] > 1.1 * stats["target_ms"]
    assert [_kept(gm, c) for c in ("conv1", "conv2", "conv3")] == [8, 8, 8]     # every group at its minimum
    assert any(d.level == "warning" and "could not reach the target" in d.message for d in rec.diagnostics)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_latency_aware_pruning_on_torchvision_classifiers(tmp_path, name):
    """Residual groups (ResNet) and depthwise convolutions (MobileNet) through the fake table."""
    import torchvision

    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    table = _table(tmp_path, sixteen_fast)
    gm = graphsel.transform(model, [("prune", {"target_latency": 0.5, "runtime": table}), "fold_masks", "materialize"],
                            (x,), verify=False)
    stats = graphsel_meta(gm).history[0].stats["latency"]
    assert stats["measured_ms"] < stats["dense_ms"]
    assert abs(stats["measured_ms"] - stats["target_ms"]) <= 0.1 * stats["target_ms"], stats["attempts"]
    assert gm(x).shape == (1, 1000)


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["resnet50", "densenet121", "mobilenet_v2", "convnext_tiny", "efficientnet_b0"])
def test_latency_aware_pruning_on_the_issues_five_models(tmp_path, name):
    """The five models of the latency benchmark, through the fake table: target met within 10 %."""
    import torchvision

    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    gm = graphsel.transform(model, [("prune", {"target_latency": 0.5, "runtime": _table(tmp_path, sixteen_fast)}),
                                    "fold_masks", "materialize"], (x,), verify=False)
    stats = graphsel_meta(gm).history[0].stats["latency"]
    assert stats["target_met"], stats["attempts"]
    assert graphsel.cost(gm, x).macs < graphsel.cost(model, x).macs


# ------------------------------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("value", [0, 0.0, 1, 1.5, -0.2, "fast", "0ms", "-3ms", True])
def test_bad_targets_say_how_to_write_one(value):
    with pytest.raises(ValueError, match="fraction in \\(0, 1\\).*'12ms'"):
        graphsel.resolve_pass(("prune", {"target_latency": value}))


def test_target_parsing():
    assert parse_target_latency(0.25) == ("fraction", 0.25)
    assert parse_target_latency("12ms") == ("ms", 12.0)
    assert parse_target_latency(" 3.5 ms") == ("ms", 3.5)


@pytest.mark.parametrize("opts, match", [
    ({"target_latency": 0.5, "runtime": "tensorrt"}, "unknown runtime 'tensorrt'"),
    ({"target_latency": 0.5, "runtime": "onnxrt"}, "Did you mean 'onnxruntime'"),
    ({"runtime": "eager"}, "pass target_latency= too"),
    ({"target_latency": 0.5, "round_to": 8}, "drop round_to"),
    ({"target_latency": 0.5, "target_macs": 0.5}, "drop target_macs"),
])
def test_bad_latency_options(opts, match):
    with pytest.raises(ValueError, match=match):
        graphsel.resolve_pass(("prune", opts))


def test_an_unavailable_runtime_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(lat, "cxx_compiler", lambda: None)
    with pytest.raises(GraphselError, match="runtime 'inductor' is unavailable: no C\\+\\+ compiler.*eager always works"):
        graphsel.transform(ThreeConvs(16), [("prune", {"target_latency": 0.5, "runtime": "inductor"})], (X,))


def test_latency_table_batch_must_be_positive():
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        LatencyTable("eager", batch=0, cache=False)


# ------------------------------------------------------------------------------------------------
# the table's cache

def test_the_table_is_cached_on_disk_and_keyed(tmp_path, monkeypatch):
    calls = []

    def counting(shape):
        calls.append(shape.key())
        return 1.0 + shape.out_channels

    shapes = [LayerShape("conv", 16, w, (1, 16, 8, 8), (3, 3), (1, 1), (1, 1), (1, 1)) for w in (8, 16, 8)]
    t1 = LatencyTable("eager", cache_dir=tmp_path, timer=counting, progress=False)
    assert t1.measure(shapes) == [9.0, 17.0, 9.0] and len(calls) == 2        # each shape measured once
    data = json.loads(t1.path.read_text())
    assert data["key"]["runtime"] == "eager" and data["key"]["threads"] == t1.threads
    assert data["key"]["cpu"] == lat.cpu_model() and data["key"]["torch"] == torch.__version__
    assert len(data["entries"]) == 2
    t2 = LatencyTable("inductor", cache_dir=tmp_path, timer=counting, progress=False)   # measured eagerly too
    assert t2.path == t1.path and t2.measure(shapes) == [9.0, 17.0, 9.0] and len(calls) == 2   # read, not measured
    t3 = LatencyTable("eager", cache_dir=tmp_path, timer=counting, threads=t1.threads + 1, progress=False)
    assert t3.path != t1.path
    t3.measure(shapes)
    assert len(calls) == 4                                                   # another key: measured again
    t4 = LatencyTable("onnxruntime", cache_dir=tmp_path, timer=counting, progress=False)
    assert t4.path != t1.path and "onnxruntime" in t4.key
    # a file whose key differs (another machine, say) is not trusted
    data["key"]["cpu"] = "another CPU"
    t1.path.write_text(json.dumps(data))
    assert LatencyTable("eager", cache_dir=tmp_path, timer=counting, progress=False).entries == {}
    monkeypatch.setenv("GRAPHSEL_CACHE_DIR", str(tmp_path / "env"))
    assert LatencyTable("eager", cache=False).cache_dir == tmp_path / "env" / "latency"


def test_grid_widths():
    assert grid_widths(64) == [8, 16, 24, 32, 40, 48, 56, 64]
    assert grid_widths(2048)[:2] == [64, 128] and grid_widths(2048)[-1] == 2048 and len(grid_widths(2048)) <= 33
    assert grid_widths(6) == [1, 2, 3, 4, 5, 6]
    assert grid_widths(100, low=30)[0] == 30 and 32 in grid_widths(100, low=30) and grid_widths(100)[-1] == 100


# ------------------------------------------------------------------------------------------------
# real timers (numbers only, never compared)

@pytest.mark.parametrize("shape", [
    LayerShape("conv", 8, 16, (1, 8, 6, 6), (3, 3), (1, 1), (1, 1), (1, 1)),
    LayerShape("conv", 8, 8, (1, 8, 6, 6), (3, 3), (2, 2), (1, 1), (1, 1), groups=8, depthwise=True),
    LayerShape("linear", 8, 4, (2, 8)),
    LayerShape("linear", 8, 4, (2, 3, 8), bias=False),
])
def test_real_layer_timers_and_the_one_node_onnx_graph(shape):
    pytest.importorskip("onnxruntime")
    assert lat.time_layer_eager(shape, min_reps=2, min_ms=0.0) > 0
    assert lat.time_layer_onnxruntime(shape, min_reps=2, min_ms=0.0) > 0
    sess = lat.ort_session(lat.layer_onnx(shape), 1)
    out = sess.run(None, {"x": np.zeros(shape.input_shape, dtype=np.float32)})[0]
    with torch.no_grad():
        assert out.shape == tuple(shape.module()(torch.zeros(shape.input_shape)).shape)


def test_resized_shapes():
    s = LayerShape.of_module(nn.Conv2d(32, 32, 3, groups=32), (1, 32, 8, 8))
    assert s.depthwise and s.resized(16, 99) == LayerShape.of_module(nn.Conv2d(16, 16, 3, groups=16), (1, 16, 8, 8))
    s = LayerShape.of_module(nn.Linear(10, 5), (4, 7, 10))
    assert s.resized(6, 3).input_shape == (4, 7, 6) and s.with_batch(32).input_shape == (32, 7, 10)


# ------------------------------------------------------------------------------------------------
# the runtime benchmark and the CLI

def test_benchmark_runtimes_returns_a_table_and_names_the_fastest(monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(lat, "cxx_compiler", lambda: None)      # inductor / AOTI: reported, not compiled
    gm = graphsel.transform(ThreeConvs(8), ["fold_masks"], (X,), verify=False)
    table = graphsel.benchmark_runtimes(gm, runtimes=("eager", "inductor", "aoti", "onnxruntime"), repeats=3,
                                        warmup=1, threads=1, progress=False)
    assert [r.runtime for r in table.rows] == ["eager", "inductor", "aoti", "onnxruntime"]
    assert table["eager"].ok and table["onnxruntime"].ok
    assert table["inductor"].status.startswith("unavailable: no C++ compiler")
    assert table["aoti"].status.startswith("unavailable")
    assert table.fastest in ("eager", "onnxruntime")
    assert table.export_format == {"eager": "pt2", "onnxruntime": "onnx"}[table.fastest]
    assert all(len(table[r].samples_ms) == 3 and table[r].max_abs_error < 1e-3 for r in ("eager", "onnxruntime"))
    text = str(table)
    assert "◀ fastest" in text and "unavailable: no C++ compiler" in text
    assert json.loads(json.dumps(table.to_dict()))["fastest"] == table.fastest


def test_benchmark_runtimes_bad_input():
    with pytest.raises(ValueError, match="unknown runtime"):
        graphsel.benchmark_runtimes(ThreeConvs(8), (X,), runtimes=("tvm",))
    with pytest.raises(graphsel.ExampleInputError, match="needs example inputs"):
        graphsel.benchmark_runtimes(ThreeConvs(8))


def test_cli_bench_runtimes(capsys, monkeypatch):
    pytest.importorskip("onnxruntime")
    code = main(["bench-runtimes", "graphsel:tiny_convnet", "--input-shape", "1,3,32,32", "--runtimes",
                 "eager,onnxruntime", "--repeats", "2", "--warmup", "1", "--threads", "1", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    assert data["fastest"] in ("eager", "onnxruntime") and [r["runtime"] for r in data["rows"]] == ["eager", "onnxruntime"]
    code = main(["bench-runtimes", "graphsel:tiny_convnet", "--runtimes", "eager,tensorrt"])
    _, err = capsys.readouterr()
    assert code == 2 and "unknown runtime(s) tensorrt" in err


def test_export_aoti_without_a_compiler_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(lat, "cxx_compiler", lambda: None)
    gm = graphsel.trace(ThreeConvs(8), (X,))
    with pytest.raises(graphsel.ExportError, match="format 'aoti' needs AOTInductor: no C\\+\\+ compiler"):
        graphsel.export(gm, tmp_path / "m.aoti.pt2", "aoti")


@pytest.mark.slow
def test_export_aoti_and_the_compiled_runtimes(tmp_path):
    """Compiles C++ (tens of seconds): AOTInductor export reloads and matches; inductor and AOTI rows run."""
    if lat.cxx_compiler() is None:
        pytest.skip("no C++ compiler")
    gm = graphsel.trace(ThreeConvs(8), (X,))
    res = graphsel.export(gm, tmp_path / "m.aoti.pt2", "aoti")
    assert res.max_abs_error is not None and res.max_abs_error <= res.tolerance
    table = graphsel.benchmark_runtimes(gm, runtimes=("eager", "inductor", "aoti"), repeats=2, warmup=1)
    assert all(r.ok for r in table.rows), str(table)


def test_the_end_to_end_measurement_corrects_a_wrong_table(tmp_path):
    """The clock disagrees with the table (fixed overhead, and every layer 1.7× slower in the
    model than alone): the first allocation misses, the corrections bracket the target."""
    sum_layers = _model_timer(additive)

    def clock(model, inputs):
        return 50.0 + 1.7 * sum_layers(model, inputs)
    table = LatencyTable("eager", cache_dir=tmp_path, timer=additive, model_timer=clock, progress=False)
    gm = graphsel.transform(ThreeConvs(128), [("prune", {"target_latency": 0.5, "runtime": table})], (X,), verify=False)
    stats = graphsel_meta(gm).history[0].stats["latency"]
    assert len(stats["attempts"]) > 1 and abs(stats["attempts"][0]["error"]) > 0.1
    assert stats["target_met"], stats["attempts"]


def test_next_fraction_brackets():
    from graphsel.passes.prune_latency import _next_fraction
    assert _next_fraction([(0.5, 0.3, 0.5)]) > 0.5                       # too fast: aim higher
    assert _next_fraction([(0.5, 0.7, 0.5)]) < 0.5                       # too slow: aim lower
    assert _next_fraction([(0.5, 0.3, 0.5), (0.8, 0.7, 0.5)]) == pytest.approx((0.5 * 0.8) ** 0.5)
