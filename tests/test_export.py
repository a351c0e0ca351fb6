"""``graphsel.export``: every format loads and runs in a Python process where graphsel cannot be
imported, and reproduces the in-process model (ONNX through onnxruntime).

The clean process is one long-lived interpreter per test worker, started with ``-I -S`` (no
current directory, no user site, no ``.pth`` processing, so the editable install's import hook
never runs) and only the virtual environment's site-packages directory appended to ``sys.path``.
It asserts ``importlib.util.find_spec("graphsel") is None`` at start-up and that no graphsel
module was imported after loading each batch of artefacts.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
import sysconfig
import textwrap
import types

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import graphsel
from graphsel.tools.export import FORMATS, ExportError, export, graphsel_references, plain_graph_module
from graphsel.ir.graph import add_module
from graphsel.ir.meta import graphsel_meta
from strategies import architectures

SLIM = [("prune", {"ratio": 0.5, "round_to": 8}), "fold_masks", "materialize", "fuse_bn"]

CLEAN_SERVER = textwrap.dedent(r"""
    import importlib.util, json, sys, traceback, warnings
    sys.path.append(SITE_PACKAGES)
    assert importlib.util.find_spec("graphsel") is None, "graphsel is importable in the clean process"
    warnings.simplefilter("ignore")
    import torch
    torch.set_num_threads(1)

    def run(fmt, path, inputs):
        if fmt == "onnx":
            import onnxruntime as ort
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sess = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
            return [torch.from_numpy(o) for o in sess.run(None, feed)]
        if fmt == "pt2":
            model = torch.export.load(path).module()
        elif fmt == "torchscript":
            model = torch.jit.load(path)
        else:
            model = torch.load(path, weights_only=False)
            model.eval()
        with torch.no_grad():
            out = model(*inputs)
        return [out] if isinstance(out, torch.Tensor) else list(out)

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        try:
            inputs = torch.load(req["inputs"], weights_only=True)
            outs = {fmt: run(fmt, path, inputs) for fmt, path in req["artefacts"].items()}
            torch.save(outs, req["outputs"])
            leaked = sorted(m for m in sys.modules if m.split(".")[0] == "graphsel")
            print(json.dumps({"ok": True, "graphsel_modules": leaked}), flush=True)
        except Exception:
            print(json.dumps({"ok": False, "error": traceback.format_exc()}), flush=True)
""")


class CleanPython:
    """A Python interpreter without graphsel that loads artefacts and returns their outputs."""

    def __init__(self, workdir):
        site = sysconfig.get_paths()["purelib"]
        code = f"SITE_PACKAGES = {site!r}\n" + CLEAN_SERVER
        self.workdir = workdir
        self.stderr = open(workdir / "clean-python.stderr", "w+")
        self.proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", code], cwd=workdir, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr)
        first = self._reply()
        assert first.get("ready"), first
        self.calls = 0

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.stderr.seek(0)
            raise RuntimeError(f"clean python exited: {self.stderr.read()[-3000:]}")
        return json.loads(line)

    def run(self, artefacts: dict[str, str], inputs: tuple) -> dict[str, list[torch.Tensor]]:
        self.calls += 1
        in_path = self.workdir / f"inputs-{self.calls}.pt"
        out_path = self.workdir / f"outputs-{self.calls}.pt"
        torch.save(tuple(inputs), in_path)
        self.proc.stdin.write(json.dumps({"inputs": str(in_path), "outputs": str(out_path),
                                          "artefacts": artefacts}) + "\n")
        self.proc.stdin.flush()
        reply = self._reply()
        assert reply["ok"], reply.get("error")
        assert reply["graphsel_modules"] == [], f"graphsel was imported: {reply['graphsel_modules']}"
        return torch.load(out_path, weights_only=True)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.stderr.close()


@pytest.fixture(scope="module")
def clean_python(tmp_path_factory):
    py = CleanPython(tmp_path_factory.mktemp("clean-python"))
    yield py
    py.close()


def _outputs(model, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model.eval()(*inputs)
    return [out] if isinstance(out, torch.Tensor) else list(out)


def _export_all(gm, inputs, where, formats=FORMATS) -> dict[str, str]:
    paths = {}
    for fmt in formats:
        result = export(gm, where / f"model-{fmt}", fmt, inputs)
        assert result.path.exists() and result.format == fmt
        assert result.max_abs_error is not None and result.max_abs_error <= result.tolerance
        paths[fmt] = str(result.path)
        if fmt == "pickle":
            assert graphsel_references(result.path) == set()
    return paths


def _assert_reproduces(clean_python, gm, inputs, paths):
    want = _outputs(gm, inputs)
    got = clean_python.run(paths, inputs)
    assert set(got) == set(paths)
    for fmt, outs in got.items():
        assert len(outs) == len(want), fmt
        for a, b in zip(outs, want):
            assert a.shape == b.shape, fmt
            tol = 1e-4 * float(b.abs().max()) + (1e-4 if fmt == "onnx" else 1e-5)
            assert float((a - b).abs().max()) <= tol, (fmt, float((a - b).abs().max()))


# ------------------------------------------------------------------------------------------------
# real models

@pytest.fixture(scope="module")
def slim_resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = (torch.randn(1, 3, 64, 64),)
    gm = graphsel.transform(model, SLIM, x)
    assert graphsel.cost(gm).macs < graphsel.cost(model, x).macs / 2  # it is slimmer
    return gm, x


def test_slim_resnet18_every_format_runs_without_graphsel(slim_resnet18, clean_python, tmp_path):
    gm, x = slim_resnet18
    paths = _export_all(gm, x, tmp_path)
    _assert_reproduces(clean_python, gm, x, paths)
    # other inputs than the example: the artefacts are programs, not recordings
    x2 = (torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(7)),)
    _assert_reproduces(clean_python, gm, x2, paths)


def test_export_leaves_the_model_and_its_history_untouched(slim_resnet18, tmp_path):
    gm, x = slim_resnet18
    gm.train()
    history = list(graphsel_meta(gm).history)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    export(gm, tmp_path / "m.pt", "pickle", x)
    assert gm.training and graphsel_meta(gm).history == history
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
    gm.eval()


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arch=architectures(max_blocks=3))
def test_random_architectures_export_and_run_without_graphsel(arch, clean_python, tmp_path_factory):
    model = arch.build()
    x = arch.example_inputs()
    gm = graphsel.transform(model, [("prune", {"ratio": 0.3})] + SLIM[1:], x)
    where = tmp_path_factory.mktemp("arch")
    formats = FORMATS
    if _uneven_adaptive_max_pool(gm):
        # ONNX has no adaptive max pooling whose output size does not divide the input size:
        # the export must say so; every other format must work
        with pytest.raises(ExportError, match="adaptive_max_pool2d"):
            export(gm, where / "model-onnx", "onnx", x)
        formats = tuple(f for f in FORMATS if f != "onnx")
    paths = _export_all(gm, x, where, formats)
    _assert_reproduces(clean_python, gm, x, paths)


def _uneven_adaptive_max_pool(gm) -> bool:
    """Whether some adaptive max pooling's output size does not divide its input size."""
    for n in gm.graph.nodes:
        pool = (isinstance(gm.get_submodule(n.target), torch.nn.AdaptiveMaxPool2d) if n.op == "call_module"
                else n.op == "call_function" and "adaptive_max_pool2d" in getattr(n.target, "__name__", ""))
        if pool:
            size_in = n.args[0].meta["tensor_meta"].shape[-2:]
            size_out = n.meta["tensor_meta"].shape[-2:]
            if any(i % o for i, o in zip(size_in, size_out)):
                return True
    return False


# ------------------------------------------------------------------------------------------------
# graphsel pieces inside the graph

class _Holder(torch.nn.Module):
    """A tensor holder like Materialize's gather index (a graphsel class in this test's eyes)."""


# make the class importable under a graphsel module name, as Materialize's holders are
_Holder.__module__ = "graphsel._testing_export"
sys.modules.setdefault("graphsel._testing_export", types.ModuleType("graphsel._testing_export"))._Holder = _Holder


def _gm_with_graphsel_holder():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.ReLU()).eval()
    x = (torch.randn(2, 3, 10, 10),)
    gm = graphsel.trace(net, x)
    holder = _Holder()
    holder.register_buffer("index", torch.tensor([4, 0, 2]))
    path = add_module(gm, "graphsel_gather", holder)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        idx = gm.graph.get_attr(f"{path}.index")
        gather = gm.graph.call_function(torch.index_select, (out.args[0], 1, idx))
    out.args = (gather,)
    gm.recompile()
    return gm, x


def test_a_plain_torch_save_of_a_graphsel_graph_references_graphsel():
    """What export fixes: torch.save(gm) pickles gm.meta and the tracer class (graphsel objects)."""
    gm, _ = _gm_with_graphsel_holder()
    buf = io.BytesIO()
    torch.save(gm, buf)
    refs = graphsel_references(buf.getvalue())
    assert any("GraphselMeta" in r for r in refs) and any("_Holder" in r for r in refs), refs


def test_graphsel_holder_modules_become_plain_modules(clean_python, tmp_path):
    gm, x = _gm_with_graphsel_holder()
    plain = plain_graph_module(gm)
    assert type(plain.get_submodule("graphsel_gather")) is torch.nn.Module
    assert plain.meta == {} and plain._tracer_cls is None
    paths = _export_all(gm, x, tmp_path)
    _assert_reproduces(clean_python, gm, x, paths)


@pytest.mark.filterwarnings("ignore:graphsel.export")  # the pickle may fall back to torch.export (said in a warning)
@pytest.mark.parametrize("pass_name", ["insert_selective_conv", "dynamic_group_conv"])
def test_graphsel_modules_with_a_forward_export_without_graphsel(pass_name, clean_python, tmp_path):
    """Selective and dynamic-group convolutions (graphsel classes with their own forward) are
    inlined, or the pickle falls back to torch.export's module."""
    from graphsel.tools.models import densenet_cifar, tiny_convnet

    torch.manual_seed(0)
    model = (densenet_cifar(10, 4) if pass_name == "insert_selective_conv" else tiny_convnet()).eval()
    x = (torch.randn(2, 3, 32, 32),)
    gm = graphsel.transform(model, [pass_name], x)
    assert any(type(m).__module__.startswith("graphsel") for m in gm.modules())
    paths = _export_all(gm, x, tmp_path, formats=("pickle", "pt2"))
    _assert_reproduces(clean_python, gm, x, paths)


# ------------------------------------------------------------------------------------------------
# results and bad input

def test_result_reports_files_method_and_loader(tmp_path):
    gm, x = _gm_with_graphsel_holder()
    r = export(gm, tmp_path, "torchscript")  # a directory: model.torchscript.pt inside it; inputs from the trace
    assert r.path == tmp_path / "model.torchscript.pt" and r.files == [r.path]
    assert r.method in ("torch.jit.script", "torch.jit.trace") and r.checked_with == "torch.jit.load"
    assert r.load == "torch.jit.load(path)" and r.seconds > 0
    assert json.loads(json.dumps(r.to_dict()))["format"] == "torchscript"
    assert "max abs error" in str(r)


def test_an_artefact_that_does_not_reproduce_the_model_is_an_error(tmp_path, monkeypatch):
    from graphsel.tools import export as ex

    gm, x = _gm_with_graphsel_holder()
    real = ex._run_artefact
    monkeypatch.setattr(ex, "_run_artefact", lambda result, inputs: [t + 0.5 for t in real(result, inputs)])
    with pytest.raises(ExportError, match="differs from the model: max abs error 0.5"):
        export(gm, tmp_path / "m.pt2", "pt2", x)


def test_onnx_falls_back_to_the_legacy_exporter_with_a_warning(tmp_path, monkeypatch):
    real = torch.onnx.export

    def dynamo_fails(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("dynamo exporter unavailable")
        return real(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    gm, x = _gm_with_graphsel_holder()
    with pytest.warns(UserWarning, match="dynamo ONNX exporter failed .*dynamo exporter unavailable.*legacy"):
        r = export(gm, tmp_path / "m.onnx", "onnx", x)
    assert r.method == "torch.onnx.export(dynamo=False)" and r.checked_with == "onnxruntime"
    assert r.max_abs_error <= r.tolerance


def test_bad_input(tmp_path):
    gm, x = _gm_with_graphsel_holder()
    with pytest.raises(ValueError, match="unknown export format 'onxx'. Did you mean 'onnx'"):
        export(gm, tmp_path / "m", "onxx")
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        export(lambda t: t, tmp_path / "m", "pt2")
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1))
    with pytest.raises(graphsel.ExampleInputError, match="needs example inputs"):
        export(plain, tmp_path / "m.pt2", "pt2")
    with pytest.raises(TypeError, match="example_inputs\\[0\\] is a str"):
        export(gm, tmp_path / "m.pt2", "pt2", ("x",))
    with pytest.raises(ExportError, match="torch.export.export failed"):
        export(gm, tmp_path / "m.pt2", "pt2", (torch.randn(2, 5, 10, 10),))


def test_the_graphsel_format_is_graphsels_checkpoint_checked_exactly(tmp_path):
    """format="graphsel" writes graphsel.save's data-only checkpoint (the model as it is, history
    kept) and checks the reloaded model bit for bit; it needs graphsel, so it is not in FORMATS."""
    from graphsel.tools.export import GRAPHSEL_FORMAT

    assert GRAPHSEL_FORMAT not in FORMATS
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 4, 3)).eval()
    gm = graphsel.transform(net, [("prune", {"ratio": 0.5}), "fold_masks", "materialize"], torch.randn(2, 3, 10, 10))
    gm.train()
    r = export(gm, tmp_path, "graphsel")
    assert r.path == tmp_path / "model.graphsel" and r.max_abs_error == 0.0 and r.tolerance == 0.0
    assert r.load == "graphsel.load_model(path)" and r.checked_with == "graphsel.load_model"
    loaded = graphsel.load_model(r.path)
    assert loaded.training and graphsel_meta(loaded).history == graphsel_meta(gm).history
    with pytest.raises(ValueError, match="Did you mean 'graphsel'"):
        export(gm, tmp_path / "m", "graphsl")


def test_a_plain_module_pickles_without_example_inputs(tmp_path):
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU())
    r = export(plain, tmp_path / "m.pt", "pickle")
    assert r.max_abs_error is None and r.method == "torch.save(module)"
    assert isinstance(torch.load(r.path, weights_only=False), torch.nn.Sequential)


def test_a_graph_module_with_graphsel_functions_cannot_be_plain(tmp_path):
    gm, x = _gm_with_graphsel_holder()
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        node = gm.graph.call_function(_graphsel_function, (out.args[0],))
    out.args = (node,)
    gm.recompile()
    with pytest.raises(ExportError, match="calls graphsel functions"):
        plain_graph_module(gm)
    # the pickle falls back to torch.export, which inlines the function
    with pytest.warns(UserWarning, match="pickled torch.export's module"):
        r = export(gm, tmp_path / "m.pt", "pickle", x)
    assert graphsel_references(r.path) == set() and r.method == "torch.save(torch.export module)"


def _graphsel_function(t):
    return t * 2


_graphsel_function.__module__ = "graphsel._testing_export"
sys.modules["graphsel._testing_export"]._graphsel_function = _graphsel_function
