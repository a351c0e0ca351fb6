"""Where selective convolution applies: the ``insert_selective_conv`` pattern on torchvision's classification zoo.

For every model (built on the ``meta`` device: no weights, no memory, seconds for the whole zoo) the
pass is run without verification and reports how many convs became selective, the input slots they
hold, the share of the model's conv MACs they cover, and why the other convs were skipped (grouped,
no BN → ReLU chain in front, a BN or ReLU output feeding other nodes, shared modules, ...).
Exactness on real weights is checked by ``tests/test_selective_conv_zoo.py`` (``-m zoo``).

Run: ``python -m benchmarks.sconv_zoo`` (about a minute) or ``--quick`` (a few models). Writes
``benchmarks/results/sconv_zoo{,_quick}.{json,md}``.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import graphsel
from benchmarks.common import classification_models, environment, environment_line, error_record, input_size, table, write_results
from graphsel.analysis.cost import meta_model
from graphsel.passes import selective_conv as sc

REASONS = (("grouped", "grouped conv"), ("also feeds", "BN/ReLU output feeds other nodes"),
           ("called at", "shared module"), ("placeholder", "reads the model input"),
           ("not relu", "no ReLU in front"), ("not batch_norm", "no BatchNorm2d in front"),
           ("not BatchNorm2d", "no BatchNorm2d in front"), ("own forward", "BN subclass"),
           ("functional conv2d", "functional conv"))


def reason_of(message: str) -> str:
    for needle, label in REASONS:
        if needle in message:
            return label
    return "other"


def scan(name: str) -> dict:
    import torchvision
    s = input_size(name)
    kwargs = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}
    model = meta_model(torchvision.models.get_model, name, **kwargs).eval()
    x = torch.empty(1, 3, s, s, device="meta")
    t0 = time.perf_counter()
    gm = graphsel.transform(model, ["insert_selective_conv"], x, verify=False, progress=False)
    seconds = time.perf_counter() - t0
    record = graphsel.graphsel_meta(gm).history[-1]
    reasons = Counter(reason_of(d.message) for d in record.diagnostics if d.level == "skip")
    report = graphsel.cost(gm)
    conv_macs = sum(r.macs for r in report.rows if r.category == "conv")
    sconv_macs = sum(r.macs for r in report.rows if r.kind == "SelectiveConv2d")
    mods = sc.selective_modules(gm)
    return {"model": name, "input": s, "selective_convs": len(mods), "skipped_convs": record.stats["skipped"],
            "slots": sum(m.in_channels for _, m in mods), "one_by_one": sum(m.K > 0 for _, m in mods),
            "conv_macs_covered": sconv_macs / conv_macs if conv_macs else 0.0, "skip_reasons": dict(reasons),
            "seconds": seconds}


def markdown(res: dict) -> str:
    rows = [[r["model"], r["selective_convs"], r["one_by_one"], r["skipped_convs"], r["slots"],
             f"{100 * r['conv_macs_covered']:.0f} %", ", ".join(f"{k} {v}" for k, v in sorted(r["skip_reasons"].items()))]
            for r in res["models"] if "error" not in r]
    with_pattern = [r["model"] for r in res["models"] if r.get("selective_convs")]
    lines = [f"# Selective convolution coverage of the torchvision classification zoo{' (quick)' if res['quick'] else ''}",
             "", environment_line(res["environment"]), "",
             f"**{len(with_pattern)} of {len(res['models'])} models have the BatchNorm2d → ReLU → [Dropout] → "
             f"Conv2d(groups=1) pattern**: {', '.join(with_pattern)}.", "",
             "Per model: selective convs inserted (of which 1×1, K = 3), convs skipped, input slots, the share of conv "
             "MACs in selective convs, and why the skipped convs were skipped.", ""]
    lines.append(table(rows, ["model", "selective", "1×1", "skipped", "slots", "conv MACs covered", "skip reasons"]))
    errors = [r for r in res["models"] if "error" in r]
    if errors:
        lines += ["", "Errors:", ""] + [f"- {r['model']}: {r['error']['message']}" for r in errors]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    names = classification_models()
    if args.quick:
        names = [n for n in names if n in ("resnet18", "densenet121", "mobilenet_v2", "vit_b_16")]
    env = environment()
    rows = []
    for name in names:
        try:
            rows.append(scan(name))
        except Exception as e:  # noqa: BLE001 - one failing model must not stop the sweep
            rows.append({"model": name, "error": error_record(e)})
        r = rows[-1]
        print(f"{name}: {r.get('selective_convs', 'error')} selective convs", flush=True)
    res = {"quick": args.quick, "environment": env, "models": rows,
           "with_pattern": [r["model"] for r in rows if r.get("selective_convs")]}
    js, md = write_results("sconv_zoo", res, markdown(res), quick=args.quick)
    print(f"{len(res['with_pattern'])} of {len(rows)} models have the pattern; wrote {js}, {md}")
    return res


if __name__ == "__main__":
    main()
