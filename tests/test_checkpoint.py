"""graphsel checkpoints (``graphsel.save`` / ``graphsel.load_model``): data only, exact round trips,
and nothing from a file runs unless the caller said ``trust_pickle``.

* round trips: every tensor (ties, views, strides, dtypes, requires_grad, persistence), the module
  tree, the graph (argument types torch.fx writes into code), the pass history, masks and state,
  bit-exact outputs — with ``torch.load`` forced to ``weights_only=True`` throughout; Hypothesis
  architectures through prune → fold → materialize and through the method passes;
* refusals at save time: what is not data is named with its module path and attribute;
* the loader against tampered archives: names outside the allowlist, and names torch.fx would write
  into Python source (node names, targets, the class name) carrying code — a marker file that a
  successful attack would create never appears;
* pickles: refused with a message naming the risk and ``trust_pickle``; accepted with it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import pickle
import zipfile
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings

import graphsel
from graphsel.ir.graph import module_index
from graphsel.ir.meta import graphsel_meta
from graphsel.ir.tracing import _REGISTERED_LEAVES
from graphsel.pipeline.phases import _recorded_shapes
from graphsel.tools import checkpoint
from graphsel.tools.checkpoint import CheckpointError, load_checkpoint, read_report, save_checkpoint
from graphsel.tools.zoo import ModelSpecError, UntrustedFileError, load_model, save
from strategies import architectures, conv_nets_with_bn_relu_conv

TINY = "graphsel:tiny_convnet"


# ------------------------------------------------------------------------------------------------
# helpers

@contextlib.contextmanager
def weights_only_torch_load():
    """``torch.load`` can only load data while this is active (whatever its caller asks for)."""
    real = torch.load

    def forced(*args, **kwargs):
        kwargs["weights_only"] = True
        return real(*args, **kwargs)

    with mock.patch.object(torch, "load", forced):
        yield


def round_trip(model: nn.Module) -> nn.Module:
    buf = io.BytesIO()
    save_checkpoint(model, buf)
    buf.seek(0)
    with weights_only_torch_load():
        return load_checkpoint(buf)


def _tensor_facts(t: torch.Tensor) -> tuple:
    return (type(t), t.dtype, tuple(t.shape), t.stride(), t.requires_grad, t.device)


def assert_same_model(a: nn.Module, b: nn.Module, inputs: tuple | None = None) -> None:
    """``b`` (loaded) is ``a`` (saved): module tree, tensors bit for bit with their aliasing,
    graph and code, graphsel metadata, and outputs."""
    ia, ib = module_index(a), module_index(b)
    assert list(ia) == list(ib)
    ids_a, ids_b = {}, {}
    for path in ia:
        ma, mb = ia[path], ib[path]
        assert type(ma).__qualname__ == type(mb).__qualname__ and ma.training == mb.training, path
        assert ma._non_persistent_buffers_set == mb._non_persistent_buffers_set, path
        for reg in ("_parameters", "_buffers"):
            ra, rb = getattr(ma, reg), getattr(mb, reg)
            assert list(ra) == list(rb), (path, reg)
            for k in ra:
                ta, tb = ra[k], rb[k]
                assert (ta is None) == (tb is None), (path, k)
                if ta is None:
                    continue
                assert _tensor_facts(ta) == _tensor_facts(tb), (path, k)
                assert torch.equal(ta.detach().view(-1).view(torch.uint8) if ta.numel() and ta.is_contiguous()
                                   else ta.detach(), tb.detach().view(-1).view(torch.uint8)
                                   if tb.numel() and tb.is_contiguous() else tb.detach()), (path, k)
                # the same tensor object (ties) and the same storage (views) where the saved model had them
                ids_a.setdefault(id(ta), f"{path}.{k}")
                ids_b.setdefault(id(tb), f"{path}.{k}")
                assert ids_a[id(ta)] == ids_b[id(tb)], (path, k)
    if isinstance(a, fx.GraphModule):
        assert isinstance(b, fx.GraphModule) and b.code == a.code and type(b).__name__ == type(a).__name__
        assert [(n.name, n.op, str(n.target), repr(n.args), repr(n.kwargs)) for n in a.graph.nodes] == \
            [(n.name, n.op, str(n.target), repr(n.args), repr(n.kwargs)) for n in b.graph.nodes]
        ma, mb = graphsel_meta(a, create=False), graphsel_meta(b, create=False)
        if ma is not None:
            for f in dataclasses.fields(ma):
                if f.name != "version":
                    assert getattr(ma, f.name) == getattr(mb, f.name), f.name
            assert mb.version != ma.version                  # a fresh analysis-cache key
            assert _recorded_shapes(a) == _recorded_shapes(b)
    if inputs is not None:
        with torch.no_grad():
            was = a.training
            a.eval(), b.eval()
            oa, ob = a(*inputs), b(*inputs)
            a.train(was), b.train(was)
        oa = oa if isinstance(oa, (tuple, list)) else [oa]
        ob = ob if isinstance(ob, (tuple, list)) else [ob]
        assert len(oa) == len(ob) and all(torch.equal(x, y) for x, y in zip(oa, ob))


def rewrite(src: Path, dst: Path, member: str, edit) -> Path:
    """A copy of checkpoint ``src`` with ``edit(json_of_member)`` applied to one JSON member."""
    with zipfile.ZipFile(src) as z:
        items = {n: z.read(n) for n in z.namelist()}
    doc = json.loads(items[member])
    edit(doc)
    items[member] = json.dumps(doc).encode()
    with zipfile.ZipFile(dst, "w") as z:
        for n, data in items.items():
            z.writestr(n, data)
    return dst


class Touch:
    """Unpickling this creates ``path`` (what an attack would do, harmlessly)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ------------------------------------------------------------------------------------------------
# round trips

class ArgsNet(nn.Module):
    """Graph arguments of every kind torch.fx writes into code: slices, Ellipsis, dtypes, devices,
    memory formats, inf, strings, tuples, keyword arguments."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8).view(1, 8, 1, 1))

    def forward(self, x):
        y = self.bn(self.conv(x.contiguous(memory_format=torch.channels_last)))
        y = y[..., 1:, ::2] * self.scale
        y = F.pad(y, (1, 1), mode="constant", value=float("-inf"))
        y = F.max_pool2d(y, 2, ceil_mode=True)
        y = torch.clamp(y, min=float("-inf"), max=1e30)
        y = y.to(torch.float64).to(device=torch.device("cpu"), dtype=torch.float32)
        y = torch.nan_to_num(y, nan=0.0, posinf=float("inf"), neginf=-1.0)
        return F.interpolate(y, scale_factor=2.0, mode="nearest").flatten(1).sum(-1, keepdim=True)


def test_a_transformed_graph_round_trips_exactly():
    x = torch.randn(2, 3, 12, 12)
    gm = graphsel.transform(ArgsNet().eval(), [("prune", {"ratio": 0.5}), "fold_masks", "materialize"], x)
    assert_same_model(gm, round_trip(gm), (x,))
    masked = graphsel.transform(ArgsNet().eval(), [("prune", {"ratio": 0.5})], x)
    loaded = round_trip(masked)
    assert graphsel_meta(loaded).masks == graphsel_meta(masked).masks and graphsel_meta(loaded).masks
    assert_same_model(masked, loaded, (x,))
    # a loaded graph goes on through passes like the original
    slim = graphsel.transform(loaded, ["fold_masks", "materialize"])
    assert [r.name for r in graphsel_meta(slim).history] == ["prune", "fold_masks", "materialize"]


class Tensors(nn.Module):
    """Ties, views of one storage, every dtype family, channels-last, frozen and empty tensors."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        base = torch.arange(12.0)
        self.register_buffer("full", base)
        self.register_buffer("view", base[2:10].view(2, 4))
        self.register_buffer("strided", torch.randn(4, 6)[:, ::2])
        self.register_buffer("ids", torch.arange(4), persistent=False)
        self.register_buffer("f16", torch.randn(4, dtype=torch.float16))
        self.register_buffer("bf16", torch.randn(4).to(torch.bfloat16))
        self.register_buffer("complex", torch.randn(4, dtype=torch.complex64))
        self.register_buffer("flags", torch.tensor([True, False, True, True]))
        self.register_buffer("empty", torch.empty(0, 4))
        self.frozen = nn.Parameter(torch.randn(4), requires_grad=False)
        self.conv = nn.Conv2d(4, 4, 1)
        self.conv.weight = nn.Parameter(self.conv.weight.detach().contiguous(memory_format=torch.channels_last))

    def forward(self, x):
        y = self.b(self.a(x)) + self.view.sum(0) + self.frozen + self.f16.float() + self.bf16.float()
        y = y + self.full[:4] + self.empty.sum() + self.conv(y.view(-1, 4, 1, 1)).flatten(1)
        return y + self.complex.real * self.flags + self.strided.sum(1) + self.ids


def test_tensors_round_trip_with_their_aliasing_strides_and_dtypes():
    gm = graphsel.trace(Tensors(), torch.randn(2, 4))
    gm.plain_tensor_attribute = torch.ones(3)          # not registered: a plain attribute
    gm.register_buffer("absent", None)
    loaded = round_trip(gm)
    assert_same_model(gm, loaded, (torch.randn(2, 4),))
    assert loaded.b.weight is loaded.a.weight
    full, view = loaded.full, loaded.view
    assert view.untyped_storage().data_ptr() == full.untyped_storage().data_ptr() and view.storage_offset() == 2
    assert loaded.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert "ids" not in loaded.state_dict() and not loaded.frozen.requires_grad
    assert torch.equal(loaded.plain_tensor_attribute, torch.ones(3)) and "absent" in loaded._buffers


def test_a_plain_module_of_allowlisted_classes_saves_and_loads(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.squeezenet1_1().eval()
    path = save(model, tmp_path / "squeezenet.graphsel")
    with weights_only_torch_load():
        loaded = load_model(path)
    assert type(loaded) is torchvision.models.SqueezeNet
    assert_same_model(model, loaded, (torch.randn(1, 3, 32, 32),))


def _history_options_unchanged(gm, loaded):
    return [r.options for r in graphsel_meta(gm).history] == [r.options for r in graphsel_meta(loaded).history]


@settings(max_examples=12)
@given(architectures(max_blocks=4))
def test_random_architectures_round_trip_through_prune_fold_materialize(arch):
    model, x = arch.build(), arch.example_inputs()
    masked = graphsel.transform(model, [("prune", {"ratio": 0.4})], x, verify=False)
    assert_same_model(masked, round_trip(masked), x)
    slim = graphsel.transform(masked, ["fold_masks", "materialize"], verify=False)
    assert_same_model(slim, round_trip(slim), x)


@settings(max_examples=8)
@given(conv_nets_with_bn_relu_conv(max_blocks=3))
def test_graphsels_own_modules_round_trip(arch):
    """The method passes' modules (selective and dynamic-group convolutions) are described as data."""
    model, x = arch.build(), arch.example_inputs()
    for passes in (["insert_selective_conv"], ["dynamic_group_conv"]):
        gm = graphsel.transform(model, passes, x)
        loaded = round_trip(gm)
        assert_same_model(gm, loaded, x)
        assert {type(m).__module__ for m in loaded.modules()} >= {type(m).__module__ for m in gm.modules()}


def test_metadata_that_is_not_data_is_kept_as_its_repr_and_report_works(tmp_path):
    x = torch.randn(1, 3, 32, 32)
    gm = graphsel.transform(load_model(TINY).eval(), [("prune", {"ratio": 0.25})], x)
    graphsel_meta(gm).state["mine"] = {"fn": lambda: 0, "buffer": io.BytesIO(), "cls": UserScale}
    graphsel_meta(gm).state["known"] = {"cls": nn.Conv2d, "fn": F.relu, "size": torch.Size([1, 2])}
    path = save(gm, tmp_path / "m.graphsel")
    loaded = load_model(path)
    assert graphsel_meta(loaded).state["known"] == graphsel_meta(gm).state["known"]   # allowlisted: themselves
    state = graphsel_meta(loaded).state["mine"]
    assert all(isinstance(v, checkpoint.OpaqueValue) for v in state.values())        # the rest: its repr
    assert "lambda" in state["fn"] and "BytesIO" in state["buffer"] and "UserScale" in state["cls"]
    assert "prune" in graphsel.report(loaded)


# ------------------------------------------------------------------------------------------------
# what cannot be saved as data is named

class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(2, 2))

    def forward(self, x):
        return self.inner(x)


class MyTensor(torch.Tensor):
    pass


def _main_function(x):
    return x


_main_function.__module__ = "__main__"


def _linear(m):
    return m.get_submodule("inner.0")


@pytest.mark.parametrize("spoil, match, picklable", [
    (lambda m: setattr(_linear(m), "act", lambda x: x), r"module 'inner\.0' attribute 'act'.*lambda", False),
    (lambda m: setattr(m.inner, "fn", _main_function), r"module 'inner' attribute 'fn'.*__main__", False),
    (lambda m: setattr(_linear(m), "extra", torch.zeros(2).as_subclass(MyTensor)),
     r"inner\.0' attribute 'extra'.*MyTensor", True),
    (lambda m: _linear(m).register_forward_hook(lambda mod, i, o: o), r"module 'inner\.0'.*forward hooks", False),
    (lambda m: setattr(m, "stuff", io.BytesIO()), r"the root module's attribute 'stuff'.*BytesIO", True),
])
def test_what_is_not_data_is_named_at_save_time(tmp_path, spoil, match, picklable):
    m = graphsel.trace(Holder(), torch.randn(1, 2))
    spoil(m)
    with pytest.raises(CheckpointError, match=match) as e:
        save(m, tmp_path / "m.graphsel")
    assert "trust_pickle=True" in str(e.value)
    assert not (tmp_path / "m.graphsel").exists() and not list(tmp_path.iterdir())
    if picklable:
        save(m, tmp_path / "m.graphsel.pt", trust_pickle=True)       # the explicit way out: a pickle
        with pytest.raises(UntrustedFileError):
            load_model(tmp_path / "m.graphsel.pt")
        assert isinstance(load_model(tmp_path / "m.graphsel.pt", trust_pickle=True), fx.GraphModule)


class UserScale(nn.Module):
    """A layer of the user's own, outside the allowlist."""

    def __init__(self, c):
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 2.0, c))

    def forward(self, x):
        return x * self.s.view(1, -1, 1, 1)


def test_user_classes_need_registration_to_save_and_to_load(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), UserScale(4))
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(CheckpointError, match="UserScale.*register"):
        save(model, tmp_path / "m.graphsel")
    graphsel.register_leaf_module(UserScale)
    try:
        gm = graphsel.trace(model, x)
        assert any(isinstance(m, UserScale) for m in gm.modules())
        path = save(gm, tmp_path / "m.graphsel")
        assert_same_model(gm, load_model(path), (x,))
    finally:
        _REGISTERED_LEAVES.remove(UserScale)
    with pytest.raises(CheckpointError, match="test_checkpoint:UserScale' is not on graphsel's allowlist"):
        load_model(path)


def test_a_pickle_checkpoint_is_never_called_graphsel(tmp_path):
    with pytest.raises(ModelSpecError, match="'.graphsel' files are graphsel's data-only checkpoints"):
        save(Holder(), tmp_path / "m.graphsel", trust_pickle=True)


# ------------------------------------------------------------------------------------------------
# the loader against tampered archives

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("saved")
    gm = graphsel.transform(ArgsNet().eval(), ["fuse_bn"], torch.randn(1, 3, 8, 8))
    return save(gm, d / "ok.graphsel")


def _first(doc, op):
    return next(n for n in doc["nodes"] if n["op"] == op)


def _rename_node(doc, new):
    node = _first(doc, "call_module")
    old = node["name"]
    node["name"] = new
    text = json.dumps(doc).replace(json.dumps({"$node": old}), json.dumps({"$node": new}))
    doc.clear()
    doc.update(json.loads(text))


MARKER = "PWNED_MARKER"
INJECTIONS = [
    ("modules", lambda d: d["modules"][1].update({"class": "posix:system"}), "not on graphsel's allowlist"),
    ("modules", lambda d: d["modules"][1].update({"class": "builtins:eval"}), "not on graphsel's allowlist"),
    ("modules", lambda d: d["modules"][1].update({"class": "subprocess:Popen"}), "not on graphsel's allowlist"),
    ("modules", lambda d: d["modules"][1].update({"class": "torch.hub:load"}), "not on graphsel's allowlist"),
    ("modules", lambda d: d["modules"][1].update({"class": "torch:load"}), "names 'load'"),
    ("modules", lambda d: d["modules"][1].update({"class": "torch:os.getcwd"}), "names a module"),
    ("modules", lambda d: d["modules"][1].update({"class": "torch:Tensor.__init_subclass__"}), "names '__init_subclass__'"),
    ("modules", lambda d: d["modules"][1].update({"class": "graphsel.tools.zoo:save"}), "not on graphsel's allowlist"),
    ("modules", lambda d: d["modules"][1]["attributes"].update({"x": {"$global": "posix:system"}}),
     "not on graphsel's allowlist"),
    ("modules", lambda d: d["modules"][1]["attributes"].update({"x": {"$object": "os:_wrap_close", "state": {}}}),
     "not on graphsel's allowlist"),
    ("modules", lambda d: d["modules"][1]["attributes"].update({"__class__": 1}), "attribute name"),
    ("modules", lambda d: d["modules"][1]["attributes"].update({"forward": {"$global": "builtins:getattr"}}),
     "would replace a method"),
    ("graph", lambda d: _first(d, "call_function").update({"target": {"$global": "builtins:exec"}}),
     "not on graphsel's allowlist"),
    ("graph", lambda d: _first(d, "call_function").update({"target": {"$global": "torch:save"}}), "names 'save'"),
    ("graph", lambda d: _first(d, "call_function").update({"target": {"$global": "torchvision.models:resnet18"}}),
     "model builders download weights"),
    ("graph", lambda d: _first(d, "call_function").update(
        {"target": {"$global": "graphsel.passes.dcp.finetune:finetune"}}), "not on graphsel's allowlist"),
    ("graph", lambda d: _rename_node(d, f"x); open('{MARKER}', 'w')#"), "must be a Python identifier"),
    ("graph", lambda d: _first(d, "placeholder").update({"target": f"x=open('{MARKER}','w')"}),
     "placeholder target"),
    ("graph", lambda d: _first(d, "call_method").update({"target": f'contiguous"); open("{MARKER}", "w"); ("'}),
     "method name"),
    ("graph", lambda d: _first(d, "call_method").update({"target": "__class__"}), "method name"),
    ("graph", lambda d: _first(d, "call_module").update({"target": f'conv"); open("{MARKER}", "w"); ("'}),
     "not a dotted module path"),
    ("graph", lambda d: _first(d, "get_attr").update({"target": f"scale\nopen('{MARKER}','w')"}),
     "not a dotted module path"),
    ("graph", lambda d: d.update({"class_name": f"M:\n open('{MARKER}','w')"}), "class name"),
    ("graph", lambda d: _first(d, "call_method")["kwargs"].update({f"a=open('{MARKER}','w'),b": 1}),
     "malformed arguments"),
    ("graph", lambda d: d["nodes"].insert(1, {"name": "leak", "op": "call_function",
                                              "target": {"$global": "builtins:getattr"},
                                              "args": [{"$node": "x"}, "__class__"], "kwargs": {}}),
     "literal attribute name"),
    ("graph", lambda d: _first(d, "call_function")["args"].append({"$tensor": 0}), "not allowed in a graph argument"),
]


@pytest.mark.parametrize("member, edit, match", INJECTIONS, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(INJECTIONS)])
def test_tampered_archives_are_refused_and_run_nothing(saved, tmp_path, monkeypatch, member, edit, match):
    monkeypatch.chdir(tmp_path)
    bad = rewrite(saved, tmp_path / "bad.graphsel", {"modules": "modules.json", "graph": "graph.json"}[member], edit)
    with pytest.raises(CheckpointError, match=match):
        load_model(bad)
    assert not (tmp_path / MARKER).exists()
    assert load_model(saved) is not None                      # the untouched file still loads


def test_a_newer_format_and_a_broken_archive_are_clear_errors(saved, tmp_path):
    newer = rewrite(saved, tmp_path / "newer.graphsel", "meta.json", lambda d: d.update(format_version=99))
    with pytest.raises(CheckpointError, match="written by a newer graphsel"):
        load_model(newer)
    data = Path(saved).read_bytes()
    (tmp_path / "cut.graphsel").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelSpecError):
        load_model(tmp_path / "cut.graphsel")


def test_report_reads_meta_json_only(saved, monkeypatch, capsys):
    from graphsel.tools.cli import main

    def forbidden(*a, **k):
        raise AssertionError("report touched tensors or modules")

    monkeypatch.setattr(checkpoint, "_build_modules", forbidden)
    monkeypatch.setattr(checkpoint, "load_checkpoint", forbidden)
    monkeypatch.setattr("safetensors.torch.load", forbidden)
    view = read_report(saved)
    assert [r.name for r in graphsel_meta(view).history] == ["fuse_bn"]
    assert main(["report", str(saved)]) == 0
    assert "fuse_bn" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# pickles need trust

@pytest.mark.parametrize("name, write", [
    ("evil.pt", lambda p, t: torch.save({"model": t}, p)),
    ("evil.pkl", lambda p, t: p.write_bytes(pickle.dumps(t))),
    ("evil.graphsel.pt", lambda p, t: torch.save({"format": "graphsel.GraphModule", "module": t, "meta": {}}, p)),
    ("evil.pt2", lambda p, t: torch.save(t, p)),
    ("evil.graphsel", lambda p, t: p.write_bytes(pickle.dumps(t))),
])
def test_a_malicious_pickle_is_refused_by_load_model_and_runs_nothing(tmp_path, name, write):
    marker = tmp_path / "marker"
    path = tmp_path / name
    write(path, Touch(marker))
    with pytest.raises(UntrustedFileError) as e:
        load_model(path)
    assert "trust_pickle=True" in str(e.value) and "--trust-pickle" in str(e.value)
    assert not marker.exists()
    with pytest.raises(UntrustedFileError):
        load_model("graphsel:tiny_convnet", weights=path)
    assert not marker.exists()
    if name.endswith(".pt"):
        assert "io.open" in str(e.value)                        # what unpickling would have imported


def test_trust_pickle_loads_an_ordinary_pickled_module(tmp_path):
    net = nn.Sequential(nn.Linear(3, 2))
    torch.save(net, tmp_path / "net.pt")
    with pytest.raises(UntrustedFileError, match="full pickle"):
        load_model(tmp_path / "net.pt")
    loaded = load_model(tmp_path / "net.pt", trust_pickle=True)
    assert isinstance(loaded, nn.Sequential) and torch.equal(loaded[0].weight, net[0].weight)


def test_old_pickle_checkpoints_load_with_trust_pickle(tmp_path):
    gm = graphsel.transform(load_model(TINY).eval(), ["fuse_bn"], torch.randn(1, 3, 32, 32))
    old = save(gm, tmp_path / "old.graphsel.pt", trust_pickle=True)
    with pytest.raises(UntrustedFileError):
        load_model(old)
    loaded = load_model(old, trust_pickle=True)
    assert [r.name for r in graphsel_meta(loaded).history] == ["fuse_bn"]
    # migration: load with trust once, save in the safe format
    new = save(loaded, tmp_path / "new.graphsel")
    with weights_only_torch_load():
        assert [r.name for r in graphsel_meta(load_model(new)).history] == ["fuse_bn"]


def test_pt2_needs_trust(tmp_path):
    """torch.export.load unpickles (torch 2.14: weights and constants with weights_only=False):
    a .pt2 is refused before it is opened; with trust it goes to torch.export.load (a real export is
    loaded in test_cli.py)."""
    path = tmp_path / "m.pt2"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(UntrustedFileError, match="torch.export archive.*unpickles"):
        load_model(path)
    with pytest.raises(ModelSpecError, match="cannot load .* with torch.export.load"):
        load_model(path, trust_pickle=True)


def test_state_dicts_load_into_a_named_model(tmp_path):
    torch.manual_seed(1)
    model = load_model(TINY)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "wrapped.pt")
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    for name in ("w.pt", "w.safetensors"):
        with pytest.raises(ModelSpecError, match="holds a state_dict.*weights="):
            load_model(tmp_path / name)
    with weights_only_torch_load():
        for name in ("w.pt", "wrapped.pt", "w.safetensors"):
            loaded = load_model(TINY, weights=tmp_path / name)
            assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ModelSpecError, match="does not fit"):
        load_model(TINY, width=4, weights=tmp_path / "w.pt")
    with pytest.raises(ModelSpecError, match="randomly initialised"):
        load_model("torchvision:resnet18", weights="DEFAULT")   # a torchvision weights name is not a file
