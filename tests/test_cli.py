"""The ``graphsel`` command: every subcommand end to end, and bad input → exit code 2 with a
one-line message (``--debug`` adds the traceback)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import graphsel
from graphsel.tools.cli import DEMO_PIPELINE, main, parse_pass_options, parse_shape, UsageError
from graphsel.ir.meta import graphsel_meta
from graphsel.tools.zoo import ModelSpecError, UntrustedFileError, load_model, save

TINY = "graphsel:tiny_convnet"
TINY_SHAPE = "1,3,32,32"
SLIM = "prune,fold_masks,materialize"


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_bad_input(capsys, *argv, match: str):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, (code, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("graphsel"), err
    assert "Traceback" not in err
    assert match in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------------
# commands

@pytest.mark.slow
def test_demo_slims_resnet18_and_writes_model_and_report(capsys, tmp_path):
    code, out, err = run_cli(capsys, "demo", "--out", tmp_path, "--latency-seconds", "0.05")
    assert code == 0, err
    assert "graphsel report: torchvision.models.resnet.ResNet" in out
    for name in ("prune", "fold_masks", "materialize", "fuse_bn", "eager latency, batch 1", "MACs"):
        assert name in out
    data = json.loads((tmp_path / "report.json").read_text())
    assert [p["name"] for p in data["history"]["passes"]] == [p if isinstance(p, str) else p[0] for p in DEMO_PIPELINE]
    assert data["cost_after"]["macs"] < data["cost_before"]["macs"] / 2
    assert data["latency_ms_batch1_eager"]["before"] > 0 and data["latency_ms_batch1_eager"]["after"] > 0
    formats = {e["format"]: e for e in data["exports"]}
    assert set(formats) == {"pt2", "pickle"}
    for e in formats.values():
        assert os.path.exists(e["path"]) and e["max_abs_error"] <= e["tolerance"]
    assert (tmp_path / "report.txt").read_text().startswith("graphsel report")
    # the section the selective-convolution package registers ran, and its export was exact
    sconv = data["sections"]["selective_convolution"]
    assert sconv["params"][1] < sconv["params"][0] and sconv["max_abs_error"] < 1e-4
    # the checkpoint keeps the history: `graphsel report` renders it
    code, out2, _ = run_cli(capsys, "report", data["checkpoint"])
    assert code == 0 and "materialize" in out2 and "fuse_bn" in out2


def test_convert_runs_passes_with_options_and_exports(capsys, tmp_path):
    out_file = tmp_path / "tiny.pt2"
    code, out, err = run_cli(capsys, "convert", TINY, "--passes", SLIM, "--pass-opt", "prune.ratio=0.25",
                             "--pass-opt", "prune.criterion=bn_gamma", "--input-shape", TINY_SHAPE, "--out", out_file)
    assert code == 0, err
    assert "ratio=0.25" in out and f"wrote pt2: {out_file}" in out
    program = torch.export.load(str(out_file)).module()
    assert program(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_convert_to_a_graphsel_checkpoint_then_report(capsys, tmp_path):
    ckpt = tmp_path / "tiny.graphsel"
    code, out, err = run_cli(capsys, "convert", TINY, "--passes", "fuse_bn", "--input-shape", TINY_SHAPE,
                             "--out", ckpt, "--format", "graphsel")
    assert code == 0, err
    assert f"wrote graphsel: {ckpt}" in out and "max abs error 0.00e+00" in out   # reloaded and compared: exact
    gm = load_model(str(ckpt))
    assert [r.name for r in graphsel_meta(gm).history] == ["fuse_bn"]
    code, out, _ = run_cli(capsys, "report", ckpt)
    assert code == 0 and "fuse_bn" in out and "1x3x32x32" in out
    code, out, _ = run_cli(capsys, "report", ckpt, "--json")
    assert code == 0 and json.loads(out)["passes"][0]["name"] == "fuse_bn"


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pickle", "graphsel"])
def test_convert_other_formats_into_a_directory(capsys, tmp_path, fmt):
    code, out, err = run_cli(capsys, "convert", TINY, "--passes", "fuse_bn", "--out", f"{tmp_path}{os.sep}",
                             "--format", fmt, "--no-verify")
    assert code == 0, err
    written = list(tmp_path.iterdir())
    assert len(written) == 1 and written[0].name.startswith("model.") and f"wrote {fmt}" in out


def test_passes_lists_the_registry_with_contracts_and_options(capsys):
    code, out, _ = run_cli(capsys, "passes")
    assert code == 0
    for name in ("fuse_bn", "prune", "fold_masks", "materialize"):
        assert name in out
    assert "structural" in out and "ratio=0.5" in out
    code, out, _ = run_cli(capsys, "passes", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows) == set(graphsel.available_passes())
    assert rows["prune"]["contract"] == "structural" and rows["fuse_bn"]["contract"] == "exact"
    assert all(r["doc"] for r in rows.values())


def test_cost_prints_the_table_and_totals(capsys):
    code, out, _ = run_cli(capsys, "cost", TINY, "--input-shape", TINY_SHAPE, "--top", "3")
    assert code == 0
    expected = graphsel.cost(load_model(TINY), torch.randn(1, 3, 32, 32))
    assert "total" in out and "MACs" in out and expected.summary() in out
    code, out, _ = run_cli(capsys, "cost", TINY, "--json")  # input inferred from the first convolution
    inferred = graphsel.cost(load_model(TINY))
    assert code == 0 and json.loads(out)["macs"] == inferred.macs and json.loads(out)["params"] == expected.params


def test_python_dash_m_and_help():
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "graphsel", "--help"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0
    for cmd in ("demo", "convert", "report", "passes", "cost"):
        assert cmd in proc.stdout


# ------------------------------------------------------------------------------------------------
# bad input

def test_unknown_model_names_the_closest(capsys, tmp_path):
    line = assert_bad_input(capsys, "cost", "torchvision:resnet19", match="torchvision has no model 'resnet19'")
    assert "resnet18" in line
    assert_bad_input(capsys, "cost", "graphsel:densenet", match="Closest: densenet_cifar")
    assert_bad_input(capsys, "cost", "no_such_package.models:net", match="no module named 'no_such_package'")
    assert_bad_input(capsys, "cost", "graphsel.tools.models:no_such_factory", match="has no attribute 'no_such_factory'")
    assert_bad_input(capsys, "convert", tmp_path / "missing.pt", "--passes", "fuse_bn", "--out", tmp_path / "x",
                     match="no such model file")
    assert_bad_input(capsys, "cost", "resnet18", match="no 'source:name' form")


def test_unknown_pass_and_pass_options(capsys, tmp_path):
    out = tmp_path / "x.pt2"
    assert_bad_input(capsys, "convert", TINY, "--passes", "fuse_bn,prun", "--out", out, match="Did you mean 'prune'")
    assert_bad_input(capsys, "convert", TINY, "--passes", "prune", "--pass-opt", "prune.ratoi=0.1", "--out", out,
                     match="pass 'prune' has no option 'ratoi'")
    assert_bad_input(capsys, "convert", TINY, "--passes", "prune", "--pass-opt", "fuse_bn.x=1", "--out", out,
                     match="not in --passes")
    assert_bad_input(capsys, "convert", TINY, "--passes", "prune", "--pass-opt", "ratio=0.1", "--out", out,
                     match="expected PASS.OPTION=VALUE")
    assert_bad_input(capsys, "convert", TINY, "--passes", " , ", "--out", out, match="--passes is empty")
    assert not out.exists()


def test_bad_shapes(capsys, tmp_path):
    assert_bad_input(capsys, "cost", TINY, "--input-shape", "1,3,a", match="bad --input-shape '1,3,a'")
    assert_bad_input(capsys, "cost", TINY, "--input-shape", "1,0,32", match="positive integer")
    # a shape the model cannot run: the tracer's message, on one line
    assert_bad_input(capsys, "convert", TINY, "--passes", "fuse_bn", "--input-shape", "1,5,32,32",
                     "--out", tmp_path / "x.pt2", match="do not fit the model")


def test_report_of_a_file_without_history(capsys, tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    assert_bad_input(capsys, "report", path, match="--trust-pickle")         # a pickle: refused, unread
    assert_bad_input(capsys, "report", path, "--trust-pickle", match="without graphsel history")
    save(torch.nn.Linear(2, 2), tmp_path / "plain.graphsel")
    assert_bad_input(capsys, "report", tmp_path / "plain.graphsel", match="without graphsel history")
    torch.save({"w": torch.zeros(1)}, path)
    assert_bad_input(capsys, "report", path, match="holds a state_dict")


class Touch:
    """Unpickling this creates ``path`` (what an attack would do, harmlessly)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("name", ["evil.pt", "evil.graphsel.pt", "evil.pt2", "evil.graphsel"])
def test_a_malicious_file_is_refused_by_every_command_and_never_runs(capsys, tmp_path, name):
    marker = tmp_path / "marker"
    path = tmp_path / name
    if name == "evil.graphsel":
        import pickle

        path.write_bytes(pickle.dumps(Touch(marker)))          # a pickle with the checkpoint suffix
    else:
        torch.save({"format": "graphsel.GraphModule", "module": Touch(marker), "meta": {}}, path)
    out = tmp_path / "out.pt2"
    for argv in (["report", path], ["report", path, "--json"], ["cost", path],
                 ["convert", path, "--passes", "fuse_bn", "--out", out],
                 ["cost", TINY, "--weights", path], ["convert", TINY, "--passes", "fuse_bn", "--weights", path,
                                                     "--out", out]):
        line = assert_bad_input(capsys, *argv, match="--trust-pickle")
        assert "trust_pickle=True" in line
        assert not marker.exists(), argv
    assert not out.exists()
    with pytest.raises(UntrustedFileError, match="trust_pickle=True"):
        load_model(path)
    assert not marker.exists()


def test_trust_pickle_and_weights_on_the_command_line(capsys, tmp_path):
    torch.manual_seed(3)
    model = load_model(TINY)
    torch.save(model, tmp_path / "model.pt")
    code, out, err = run_cli(capsys, "cost", tmp_path / "model.pt", "--trust-pickle", "--json")
    assert code == 0, err
    torch.save(model.state_dict(), tmp_path / "w.pt")
    code, out2, err = run_cli(capsys, "cost", TINY, "--weights", tmp_path / "w.pt", "--json")
    assert code == 0, err
    assert json.loads(out2)["params"] == json.loads(out)["params"]
    assert_bad_input(capsys, "cost", tmp_path / "w.pt", match="--weights")      # a state dict holds no model
    assert_bad_input(capsys, "cost", "graphsel:tiny_convnet", "--weights", tmp_path / "missing.pt",
                     match="no such weights file")


def test_argparse_errors_exit_2(capsys):
    assert main(["convert", TINY]) == 2  # --passes and --out are required
    assert "required" in capsys.readouterr().err
    assert main(["no-such-command"]) == 2


def test_debug_shows_the_traceback(capsys):
    code, _, err = run_cli(capsys, "--debug", "cost", "torchvision:resnet19")
    assert code == 2 and "Traceback (most recent call last)" in err and "ModelSpecError" in err


# ------------------------------------------------------------------------------------------------
# helpers and the zoo

def test_parsers():
    assert parse_shape("1,3,224,224") == parse_shape("1x3x224x224") == (1, 3, 224, 224)
    with pytest.raises(UsageError):
        parse_shape("")
    assert parse_pass_options(["prune.ratio=0.3", "prune.criterion=bn_gamma", "prune.exclude=['fc']"], ["prune"]) == \
        {"prune": {"ratio": 0.3, "criterion": "bn_gamma", "exclude": ["fc"]}}


def test_load_model_specs(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    assert isinstance(load_model("torchvision:resnet18"), torchvision.models.ResNet)
    assert type(load_model("graphsel:tiny_convnet", width=4)).__name__ == "TinyConvNet"
    assert isinstance(load_model("torch.nn:Identity"), torch.nn.Identity)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    torch.save(net, tmp_path / "net.pt")
    with pytest.raises(UntrustedFileError, match="trust_pickle=True"):
        load_model(tmp_path / "net.pt")
    assert isinstance(load_model(tmp_path / "net.pt", trust_pickle=True), torch.nn.Sequential)
    save(net, tmp_path / "net.graphsel")
    assert isinstance(load_model(tmp_path / "net.graphsel"), torch.nn.Sequential)
    with pytest.raises(ModelSpecError, match="randomly initialised"):
        load_model("torchvision:resnet18", weights="DEFAULT")
    with pytest.raises(ModelSpecError, match="does not accept these arguments"):
        load_model("graphsel:tiny_convnet", nope=1)
    with pytest.raises(ModelSpecError, match="not a torch.nn.Module"):
        load_model("builtins:dict")


def test_timm_specs():
    timm = pytest.importorskip("timm")
    assert isinstance(load_model("timm:resnet10t"), timm.models.ResNet)
    with pytest.raises(ModelSpecError, match="timm has no model 'resnet5'"):
        load_model("timm:resnet5")


def test_timm_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm → ImportError
    with pytest.raises(ModelSpecError, match="pip install timm"):
        load_model("timm:resnet18")


def test_save_keeps_history_that_torch_save_drops(tmp_path):
    gm = graphsel.transform(load_model(TINY).eval(), ["fuse_bn"], torch.randn(1, 3, 32, 32))
    torch.save(gm, tmp_path / "plain.pt")
    assert graphsel_meta(torch.load(tmp_path / "plain.pt", weights_only=False), create=False) is None
    save(gm, tmp_path / "ckpt.graphsel")
    loaded = load_model(tmp_path / "ckpt.graphsel")
    assert [r.name for r in graphsel_meta(loaded).history] == ["fuse_bn"]
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.eval()(x), gm.eval()(x))
