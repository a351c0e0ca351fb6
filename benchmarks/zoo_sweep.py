"""Zoo sweep: the models users bring — timm, pytorchcv and HuggingFace — pruned by graphsel and by Torch-Pruning.

The zoos (random weights, nothing downloaded; lists computed from the installed libraries, deterministic):

* **timm**: one small model per family — ``timm.list_models()`` grouped by the module that registers
  the model (``timm.models._registry._model_to_module``), within a family the model with the fewest
  parameters (counted on the ``meta`` device); ``--timm-per-family N`` takes the N smallest. timm's
  ``test_*`` models (tiny CI fixtures, not models anyone brings) are left out. Input: the model's
  ``pretrained_cfg.input_size``.
* **pytorchcv** (``pytorchcv.model_provider``): its CIFAR nets (``*_cifar10`` / ``*_cifar100``) and its
  ImageNet nets (every model whose ``num_classes`` is 1000), one per family — the name's prefix before
  the first digit or underscore — the smallest by parameters. Input: the model's ``in_size``. If
  pytorchcv is not installed the part is skipped and the results say so.
* **HuggingFace transformers**: every class of the image-classification auto mapping
  (``MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES``; a model type mapped to several classes gives one
  row per class), built from its default config (``AutoModelForImageClassification.from_config(
  ConfigClass())``, ``HF_HUB_OFFLINE=1``). Input: ``image_size`` (or ``vision_config.image_size``;
  default 224) and ``num_channels`` (default 3); token inputs (``main_input_name == "input_ids"``) get
  random ids of ``n_positions`` / ``max_position_embeddings``.

Within each zoo the models run smallest first. Per model, in its own **subprocess** (crash isolation),
with a time limit per stage (``--timeout``, default 300 s each for the build, graphsel and
Torch-Pruning; the process is killed after 3× that plus a minute) and an address-space limit
(``resource.setrlimit(RLIMIT_AS)``: the worker's size after its imports plus ``--memory-gb``,
default 8 GiB):

1. **build** the model (seed 0), ``eval()``, one forward under ``no_grad`` (as users do — it fills
   caches such as LeViT's attention biases). A model that cannot be built or run is ``build_failed``:
   not graphsel's fault, and left out of the percentages.
2. **graphsel**: ``graphsel.trace(model, x)`` (leafed modules, shape-specialised or not:
   ``graphsel_meta(gm).notes``), ``graphsel.analyze_channels(gm)`` (``summary()``: prunable fraction /
   frozen share; ``frozen_report()``), ``graphsel.cost`` (params, MACs); then
   ``graphsel.transform(model, [("prune", {"ratio": 0.5}), "fold_masks", "materialize"], x,
   n_random_inputs=1)`` with verification on (every pass checked; ``materialize`` against the mask
   oracle), and ``graphsel.cost`` of the result. Outcome: ``pruned_verified`` (verified, params or MACs
   reduced), ``verified_nothing_to_prune`` (verified, nothing reduced: the frozen reasons say why),
   ``graphsel_error`` (a :class:`graphsel.GraphselError`: its reason), ``raw_exception`` (any other
   exception: a graphsel bug by definition — the goal is none), ``timeout``, ``out_of_memory``.
3. **Torch-Pruning** on a fresh copy (rebuilt with the same seed, same eval forward): the standard
   recipe of ``benchmarks/common.py`` — ``BasePruner``, ``MagnitudeImportance(p=1)``, 50 % per layer,
   the classifier (the last Linear/Conv2d whose width is the output's) ignored, ``num_heads`` for
   ``nn.MultiheadAttention`` — and, as Torch-Pruning's own timm and HuggingFace examples do, for timm's
   ViT-style attention (``qkv``) and HuggingFace's self-attention (``query``/``key``/``value``), whose
   head sizes are updated after pruning. Outcome: ``pruned`` (a forward afterwards runs with the output's shape
   unchanged, and MACs or params went down), ``ran_nothing_pruned``, ``forward_failed`` (pruned, but the
   forward raises or changes the output's shape), ``error``, ``timeout``, ``out_of_memory``.
   Torch-Pruning has no reference to check its result against: "pruned" is not "verified".

A worker killed by the kernel (SIGKILL) counts as ``out_of_memory`` for the stage it was in; any other
crash (a signal) as ``raw_exception`` / ``error``.

Run: ``python -m benchmarks.zoo_sweep`` (full sweep; see the module's README line in the results for
the model counts; several hours on 2 cores — split it with ``--only``/``--limit`` and ``--resume``),
``--quick`` (8 models: 3 timm, 3 HuggingFace, 2 pytorchcv; a few minutes). ``--only timm hf pytorchcv``,
``--limit N`` (at most N models per zoo still to run), ``--resume`` (skip models already in the results
file), ``--jobs N`` (models in parallel; default 1), ``--threads`` (torch threads per worker).
Writes ``benchmarks/results/zoo_sweep{,_quick}.{json,md}`` after every model; the JSON also keeps the
zoo catalog (every candidate's parameter count, ~15 min of meta-device builds for timm and pytorchcv),
reused while the libraries' versions are unchanged (``--refresh-catalog`` recomputes it).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from benchmarks import common  # noqa: E402

STEM = "zoo_sweep"
ZOOS = ("timm", "pytorchcv", "hf")
PASSES = [("prune", {"ratio": 0.5}), "fold_masks", "materialize"]

# --quick: a few families per zoo (the representative within a family is still computed).
QUICK_TIMM_FAMILIES = ("starnet", "levit", "deit")           # a CNN, cached attention biases, a ViT
QUICK_PYTORCHCV_FAMILIES = ("cifar/resnet", "imagenet/shufflenet")
QUICK_HF_SMALLEST = 3                                         # the 3 smallest HF architectures

GS_OUTCOMES = ("pruned_verified", "verified_nothing_to_prune", "graphsel_error", "raw_exception",
               "timeout", "out_of_memory")
TP_OUTCOMES = ("pruned", "ran_nothing_pruned", "forward_failed", "error", "timeout", "out_of_memory")
PYTORCHCV_SKIP_SUFFIXES = ("_svhn", "_cub")                   # the same architectures for other datasets


# ============================================================================================
# catalog: every candidate model with its parameter count (meta device), and the selection
# ============================================================================================

def _quiet():
    warnings.filterwarnings("ignore")
    with contextlib.suppress(Exception):
        import transformers
        transformers.logging.set_verbosity_error()


def _meta_params(factory: Callable, *args, **kwargs) -> tuple[int, Any]:
    from graphsel.analysis.cost import meta_model
    m = meta_model(factory, *args, **kwargs)
    return sum(p.numel() for p in m.parameters()), m


def library_versions() -> dict[str, str | None]:
    return {k: common._version(k) for k in ("timm", "transformers", "pytorchcv", "torch", "torch-pruning")}


def _entry_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def catalog_timm(families: tuple[str, ...] | None = None, log=print) -> list[dict]:
    import timm
    from timm.models._registry import _model_to_module
    names = [n for n in timm.list_models() if not n.startswith("test_")]
    if families:
        names = [n for n in names if _model_to_module.get(n) in families]
    out = []
    t0 = time.perf_counter()
    for i, name in enumerate(names):
        e: dict[str, Any] = {"zoo": "timm", "model": name, "family": _model_to_module.get(name, "?")}
        try:
            e["params"], _ = _meta_params(timm.create_model, name, pretrained=False)
            cfg = timm.models.get_pretrained_cfg(name)
            e["input"] = [1, *(cfg.input_size if cfg is not None else (3, 224, 224))]
        except Exception as err:  # noqa: BLE001 - recorded: the model cannot be built without more
            e["catalog_error"] = _entry_error(err)
        out.append(e)
        if log and (i + 1) % 100 == 0:
            log(f"  timm catalog: {i + 1}/{len(names)} ({time.perf_counter() - t0:.0f} s)")
    return out


def pytorchcv_family(name: str) -> str:
    kind = "cifar" if name.endswith(("_cifar10", "_cifar100")) else "imagenet"
    return f"{kind}/{re.split(r'[0-9_]', name)[0]}"


def catalog_pytorchcv(families: tuple[str, ...] | None = None, log=print) -> list[dict]:
    from pytorchcv.model_provider import _models, get_model
    names = [n for n in _models if not n.endswith(PYTORCHCV_SKIP_SUFFIXES)]
    if families:
        names = [n for n in names if pytorchcv_family(n) in families]
    out = []
    t0 = time.perf_counter()
    for i, name in enumerate(names):
        e: dict[str, Any] = {"zoo": "pytorchcv", "model": name, "family": pytorchcv_family(name)}
        try:
            e["params"], m = _meta_params(get_model, name, pretrained=False)
            num_classes = getattr(m, "num_classes", None)
            cifar = e["family"].startswith("cifar/")
            e["eligible"] = bool(cifar or num_classes == 1000)      # ImageNet classifiers and CIFAR nets only
            in_size = tuple(getattr(m, "in_size", None) or ((32, 32) if cifar else (224, 224)))
            e["input"] = [1, int(getattr(m, "in_channels", 3)), *in_size]
        except Exception as err:  # noqa: BLE001
            e["catalog_error"] = _entry_error(err)
        out.append(e)
        if log and (i + 1) % 100 == 0:
            log(f"  pytorchcv catalog: {i + 1}/{len(names)} ({time.perf_counter() - t0:.0f} s)")
    return out


def hf_classes() -> list[tuple[str, str]]:
    """(model_type, class name) for every class of the image-classification auto mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as M
    out = []
    for model_type, classes in M.items():
        for cls in ([classes] if isinstance(classes, str) else list(classes)):
            out.append((model_type, cls))
    return out


def hf_build(model_type: str, cls: str, several: bool):
    """The model from its default config: the auto class where the type maps to one class, the class
    itself where it maps to several (the auto class cannot choose)."""
    import transformers
    from transformers import CONFIG_MAPPING, AutoModelForImageClassification
    config = CONFIG_MAPPING[model_type]()
    if several:
        return getattr(transformers, cls)(config), config
    return AutoModelForImageClassification.from_config(config), config


def hf_input(model, config) -> dict[str, Any]:
    """Shape and kind of the example input from the config."""
    main = getattr(model, "main_input_name", "pixel_values")
    if main == "input_ids":
        length = (getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or 64)
        return {"input": [1, int(length)], "input_kind": "ids", "vocab": int(getattr(config, "vocab_size", 2) or 2)}
    size = getattr(config, "image_size", None)
    channels = getattr(config, "num_channels", None)
    vc = getattr(config, "vision_config", None)
    if size is None and vc is not None:
        size = getattr(vc, "image_size", None)
        channels = channels or getattr(vc, "num_channels", None)
    size = size or 224
    h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
    return {"input": [1, int(channels or 3), int(h), int(w)], "input_kind": "image"}


def catalog_hf(log=print) -> list[dict]:
    pairs = hf_classes()
    per_type = Counter(t for t, _ in pairs)
    out = []
    for model_type, cls in pairs:
        several = per_type[model_type] > 1
        e: dict[str, Any] = {"zoo": "hf", "model": f"{model_type}:{cls}" if several else model_type,
                             "family": model_type, "hf_type": model_type, "hf_class": cls, "hf_several": several}
        configs = []

        def factory():
            model, config = hf_build(model_type, cls, several)
            configs.append(config)
            return model
        try:
            e["params"], m = _meta_params(factory)
            e.update(hf_input(m, configs[-1]))
        except Exception as err:  # noqa: BLE001
            e["catalog_error"] = _entry_error(err)
        out.append(e)
    return out


def build_catalog(zoos: tuple[str, ...], quick: bool, log=print) -> dict[str, Any]:
    _quiet()
    cat: dict[str, Any] = {"versions": library_versions(), "quick": quick, "zoos": {}, "unavailable": {}}
    for zoo in zoos:
        t0 = time.perf_counter()
        try:
            if zoo == "timm":
                entries = catalog_timm(QUICK_TIMM_FAMILIES if quick else None, log)
            elif zoo == "pytorchcv":
                entries = catalog_pytorchcv(QUICK_PYTORCHCV_FAMILIES if quick else None, log)
            else:
                entries = catalog_hf(log)
        except ImportError as e:
            cat["unavailable"][zoo] = f"{zoo} is not installed here ({e}); that part of the sweep is skipped"
            log(f"  {cat['unavailable'][zoo]}")
            continue
        cat["zoos"][zoo] = entries
        log(f"  catalog {zoo}: {len(entries)} candidates in {time.perf_counter() - t0:.0f} s")
    return cat


def select(cat: dict[str, Any], zoo: str, per_family: int, quick: bool) -> list[dict]:
    """The models to run: per family the ``per_family`` smallest that could be built on meta; small first."""
    entries = [e for e in cat["zoos"].get(zoo, []) if "catalog_error" not in e and e.get("eligible", True)]
    if zoo == "hf":
        # every architecture; one whose default config cannot even be built is a build_failed row
        chosen = sorted(entries, key=lambda e: (e["params"], e["model"]))
        if quick:
            return chosen[:QUICK_HF_SMALLEST]
        return chosen + sorted((e for e in cat["zoos"].get(zoo, []) if "catalog_error" in e), key=lambda e: e["model"])
    fams: dict[str, list[dict]] = defaultdict(list)
    for e in entries:
        fams[e["family"]].append(e)
    n = 1 if quick else per_family
    chosen = [m for fam in fams.values() for m in sorted(fam, key=lambda e: (e["params"], e["model"]))[:n]]
    return sorted(chosen, key=lambda e: (e["params"], e["model"]))


def catalog_counts(cat: dict[str, Any], zoo: str) -> dict[str, Any]:
    entries = cat["zoos"].get(zoo, [])
    ok = [e for e in entries if "catalog_error" not in e]
    eligible = [e for e in ok if e.get("eligible", True)]
    errs = Counter(re.sub(r"'[^']*'", "'…'", e["catalog_error"]) for e in entries if "catalog_error" in e)
    return {"candidates": len(entries), "built_on_meta": len(ok), "eligible": len(eligible),
            "families": len({e["family"] for e in eligible}), "catalog_errors": dict(errs.most_common(10))}


# ============================================================================================
# the worker: one model in its own process
# ============================================================================================

class StageTimeout(BaseException):
    """Raised by the alarm: a BaseException, so no ``except Exception`` on the way (graphsel's auto-leafing,
    a library's fallback) can swallow it."""


def stage_limit(seconds: float):
    return common.time_limit(seconds, StageTimeout)


OOM_NEEDLES = ("can't allocate memory", "cannot allocate memory", "bad_alloc", "out of memory",
               "std::bad_alloc", "not enough memory")


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_oom(e: BaseException) -> bool:
    return any(isinstance(x, MemoryError) or any(n in str(x).lower() for n in OOM_NEEDLES) for x in _chain(e))


def is_timeout(e: BaseException) -> bool:
    return any(isinstance(x, StageTimeout) for x in _chain(e))


def first_line(e: BaseException, width: int = 300) -> str:
    s = (str(e).strip().splitlines() or [""])[0]
    return s if len(s) <= width else s[: width - 1] + "…"


def err_record(e: BaseException, stage: str) -> dict[str, Any]:
    import graphsel
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    return {"stage": stage, "type": f"{type(e).__module__}.{type(e).__qualname__}".replace("builtins.", ""),
            "graphsel_error": isinstance(e, graphsel.GraphselError), "message": first_line(e),
            "full_message": str(e)[:3000], "traceback": "".join(tb[-8:])[-4000:]}


def build(spec: dict[str, Any]):
    """The model (seed 0, eval) and its example inputs (seed 1)."""
    torch.manual_seed(0)
    zoo, name = spec["zoo"], spec["model"]
    if zoo == "timm":
        import timm
        model = timm.create_model(name, pretrained=False)
    elif zoo == "pytorchcv":
        from pytorchcv.model_provider import get_model
        model = get_model(name, pretrained=False)
    else:
        model, _ = hf_build(spec["hf_type"], spec["hf_class"], spec["hf_several"])
    model.eval()
    g = torch.Generator().manual_seed(1)
    if spec.get("input_kind") == "ids":
        x = torch.randint(0, max(1, spec["vocab"] - 1), tuple(spec["input"]), generator=g)
    else:
        x = torch.randn(*spec["input"], generator=g)
    return model, (x,)


def logits_of(out):
    """The output tensor a classifier's width is read from: logits of a ModelOutput, the first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits") and isinstance(out.logits, torch.Tensor):
        return out.logits
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for o in out:
            t = logits_of(o)
            if t is not None:
                return t
    return None


def build_and_run(spec):
    model, x = build(spec)
    with torch.no_grad():
        out = model(*x)
    return model, x, logits_of(out)


def run_graphsel(model, x, rec: dict[str, Any], save: Callable[[], None]) -> None:
    import graphsel
    g = rec["graphsel"] = {"outcome": None}
    stage = "trace"
    t0 = time.perf_counter()
    try:
        gm = graphsel.trace(model, x)
        meta = graphsel.graphsel_meta(gm)
        g["trace_s"] = meta.trace_seconds
        g["leafed"] = len(meta.leafed)
        g["leafed_modules"] = [f"{r.path} ({r.cls}): {first_line(Exception(r.reason), 200)}" for r in meta.leafed][:10]
        g["specialised"] = any("specialised" in n for n in meta.notes)
        g["notes"] = [n[:400] for n in meta.notes][:10]
        stage = "cost"
        c = graphsel.cost(gm)
        g["params_before"], g["macs_before"] = int(c.params), int(c.macs)
        stage = "analyze_channels"
        try:
            a = graphsel.analyze_channels(gm)
            s = a.summary()
            g["summary"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()}
            g["frozen_share"] = round(1.0 - s["prunable_fraction"], 4) if s["source_channels"] else None
            g["frozen_report"] = a.frozen_report(8)
        except (StageTimeout, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - recorded; transform runs anyway and says what it says
            g["analysis_error"] = err_record(e, "analyze_channels")
        del gm
        save()
        stage = "transform"
        slim = graphsel.transform(model, PASSES, x, n_random_inputs=1, progress=False)   # verify=True
        g["verified"] = True
        hist = {h.name: h for h in graphsel.graphsel_meta(slim).history}
        m = hist.get("materialize")
        if m is not None:
            g["max_abs_deviation"], g["tolerance"] = m.max_abs, m.tolerance
        p = hist.get("prune")
        if p is not None:
            g["prune_stats"] = {k: v for k, v in p.stats.items() if isinstance(v, (int, float, str, bool))}
        stage = "cost_after"
        c2 = graphsel.cost(slim)
        g["params_after"], g["macs_after"] = int(c2.params), int(c2.macs)
        g["transform_s"] = time.perf_counter() - t0 - g.get("trace_s", 0.0)
        reduced = g["macs_after"] < g["macs_before"] or g["params_after"] < g["params_before"]
        g["outcome"] = "pruned_verified" if reduced else "verified_nothing_to_prune"
        if not reduced:
            g["reason"] = next((r for r in g.get("frozen_report") or [] if not r.endswith(": model output")),
                               "no frozen group besides the model output")
        del slim
    except BaseException as e:  # noqa: BLE001 - classified: nothing may end the sweep
        if isinstance(e, KeyboardInterrupt):
            raise
        g["error"] = err_record(e, stage)
        if is_timeout(e):
            g["outcome"] = "timeout"
        elif is_oom(e):
            g["outcome"] = "out_of_memory"
        elif isinstance(e, graphsel.GraphselError):
            g["outcome"] = "graphsel_error"
        else:
            g["outcome"] = "raw_exception"
        g["reason"] = f"{stage}: {g['error']['type']}: {g['error']['message']}"
    g["seconds"] = time.perf_counter() - t0


def classifier_of(model, width: int | None) -> list:
    import torch.nn as nn
    if width is None:
        return []
    found = [m for m in model.modules()
             if (isinstance(m, nn.Linear) and m.out_features == width)
             or (isinstance(m, nn.Conv2d) and m.out_channels == width)]
    return found[-1:]


def tp_counts(model, x) -> dict[str, tuple[int, int]]:
    """{counter: (params, MACs)} by graphsel.cost (the convention of graphsel's rows) and by Torch-Pruning's
    own counter, each where it works."""
    import graphsel
    import torch_pruning as tp
    out = {}
    for name, fn in (("graphsel.cost", lambda: (lambda c: (c.params, c.macs))(graphsel.cost(model, x))),
                     ("tp.utils.count_ops_and_params",
                      lambda: tuple(reversed(tp.utils.count_ops_and_params(model, x[0] if len(x) == 1 else x))))):
        try:
            p, m = fn()
            out[name] = (int(p), int(m))
        except (StageTimeout, MemoryError):
            raise
        except Exception:  # noqa: BLE001 - the other counter, or none
            pass
    return out


def _is_timm_attention(m) -> bool:
    import torch.nn as nn
    return isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int) \
        and hasattr(m, "head_dim")


def _is_hf_attention(m) -> bool:
    import torch.nn as nn
    return isinstance(getattr(m, "num_attention_heads", None), int) and hasattr(m, "attention_head_size") \
        and all(isinstance(getattr(m, k, None), nn.Linear) for k in ("query", "key", "value"))


def tp_num_heads(model) -> dict:
    """``num_heads`` for Torch-Pruning: every ``nn.MultiheadAttention`` (as in benchmarks/common.py), and — as
    Torch-Pruning's own timm and HuggingFace examples do — timm's ViT-style attention (``qkv`` + ``num_heads``)
    and HuggingFace's self-attention (``query``/``key``/``value`` + ``num_attention_heads``)."""
    import torch.nn as nn
    heads = {}
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            heads[m] = m.num_heads
        elif _is_timm_attention(m):
            heads[m.qkv] = m.num_heads
        elif _is_hf_attention(m):
            for k in ("query", "key", "value"):
                heads[getattr(m, k)] = m.num_attention_heads
    return heads


def tp_patch_attention(model) -> None:
    """After pruning, the head sizes those forwards read (Torch-Pruning's examples do the same)."""
    for m in model.modules():
        if _is_timm_attention(m):
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
        elif _is_hf_attention(m):
            m.attention_head_size = m.query.out_features // m.num_attention_heads
            if hasattr(m, "all_head_size"):
                m.all_head_size = m.query.out_features


def run_torch_pruning(spec, rec: dict[str, Any]) -> None:
    t = rec["torch_pruning"] = {"outcome": None}
    t0 = time.perf_counter()
    stage = "build"
    try:
        model, x, out = build_and_run(spec)                 # a fresh copy, same seed, same eval forward
        ref_shape = list(out.shape) if out is not None else None
        stage = "count_before"
        import torch_pruning as tp
        before = tp_counts(model, x)
        stage = "prune"
        num_heads = tp_num_heads(model)
        t["attention_hints"] = len(num_heads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.BasePruner(
                model, example_inputs=x[0] if len(x) == 1 else x,
                importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5, global_pruning=False,
                ignored_layers=classifier_of(model, ref_shape[-1] if ref_shape else None), num_heads=num_heads,
                in_channel_groups={}, out_channel_groups={})
            pruner.step()
            tp_patch_attention(model)
        t["prune_s"] = time.perf_counter() - t0
        stage = "forward"
        try:
            with torch.no_grad():
                out2 = logits_of(model(*x))
            t["forward_runs"] = True
            t["output_shape_kept"] = ref_shape is None or (out2 is not None and list(out2.shape) == ref_shape)
        except (StageTimeout, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001
            t["forward_runs"] = False
            t["error"] = err_record(e, "forward")
        stage = "count_after"
        if t["forward_runs"] and t["output_shape_kept"]:
            after = tp_counts(model, x)
            counter = next((c for c in after if c in before), None)     # one counter for both numbers
            if counter is None:
                raise RuntimeError("neither graphsel.cost nor tp.utils.count_ops_and_params counts the pruned model")
            (p0, m0), (p1, m1) = before[counter], after[counter]
            t.update(params_before=p0, macs_before=m0, params_after=p1, macs_after=m1, counter=counter)
            t["outcome"] = "pruned" if (m1 < m0 or p1 < p0) else "ran_nothing_pruned"
        else:
            t["outcome"] = "forward_failed"
            t["reason"] = (f"forward: {t['error']['type']}: {t['error']['message']}" if not t["forward_runs"]
                           else "forward: the output's shape changed")
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, KeyboardInterrupt):
            raise
        t["error"] = err_record(e, stage)
        t["outcome"] = "timeout" if is_timeout(e) else "out_of_memory" if is_oom(e) else "error"
        t["reason"] = f"{stage}: {t['error']['type']}: {t['error']['message']}"
    t["seconds"] = time.perf_counter() - t0


def worker(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    _quiet()
    torch.set_num_threads(max(1, int(spec.get("threads") or 1)))
    import graphsel  # noqa: F401 - imported before the memory cap is taken
    import torch_pruning  # noqa: F401
    if spec["zoo"] == "timm":
        import timm  # noqa: F401
    elif spec["zoo"] == "pytorchcv":
        import pytorchcv.model_provider  # noqa: F401
    else:
        import transformers  # noqa: F401
    rec: dict[str, Any] = {"stage": "build"}

    def save():
        Path(out_path).write_text(json.dumps(rec, default=str))

    timeout = float(spec["timeout"])
    with common.memory_limit(spec["memory_gb"] * 2**30 if spec.get("memory_gb") else None):
        t0 = time.perf_counter()
        b = rec["build"] = {}
        try:
            with stage_limit(timeout):
                model, x, out = build_and_run(spec)
            b["ok"] = True
            b["output_shape"] = list(out.shape) if out is not None else None
            b["actual_params"] = sum(p.numel() for p in model.parameters())
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, KeyboardInterrupt):
                raise
            b["ok"] = False
            b["error"] = err_record(e, "build")
            b["reason"] = ("timeout building or running the model" if is_timeout(e) else
                           "out of memory building or running the model" if is_oom(e) else
                           f"{b['error']['type']}: {b['error']['message']}")
        b["seconds"] = time.perf_counter() - t0
        save()
        if not b["ok"]:
            return 0
        rec["stage"] = "graphsel"
        save()
        with stage_limit(timeout):
            run_graphsel(model, x, rec, save)
        del model
        rec["stage"] = "torch_pruning"
        save()
        import gc
        gc.collect()
        with stage_limit(timeout):
            run_torch_pruning(spec, rec)
        rec["stage"] = "done"
        save()
    return 0


# ============================================================================================
# the driver
# ============================================================================================

def run_model(spec: dict[str, Any], args) -> dict[str, Any]:
    """One model in a subprocess; the row, whatever happened to the process."""
    row = {k: spec[k] for k in ("zoo", "model", "family", "params", "input") if k in spec}
    with tempfile.TemporaryDirectory(prefix="zoo_sweep_") as tmp:
        sp, op = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        sp.write_text(json.dumps(spec))
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore",
                   OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
        cmd = [sys.executable, "-m", "benchmarks.zoo_sweep", "--worker", str(sp), str(op)]
        t0 = time.perf_counter()
        hard = 3 * args.timeout + 60
        proc = subprocess.Popen(cmd, cwd=common.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        killed = False
        try:
            log, _ = proc.communicate(timeout=hard)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
            killed = True
        row["wall_s"] = round(time.perf_counter() - t0, 2)
        rec = json.loads(op.read_text()) if op.exists() and op.stat().st_size else {"stage": "start"}
    tail = (log or b"").decode(errors="replace")[-2000:]
    rc = proc.returncode
    row["build"] = rec.get("build") or {}
    row["graphsel"] = rec.get("graphsel") or {}
    row["torch_pruning"] = rec.get("torch_pruning") or {}
    stage = rec.get("stage")
    if stage != "done" and not (stage == "build" and row["build"].get("ok") is False):
        # the worker died (killed after the hard limit, a signal, a hard crash): blame the stage it was in
        if killed:
            outcome, why = "timeout", f"killed after {hard:.0f} s (3× --timeout + 60 s)"
        elif rc is not None and rc == -signal.SIGKILL:
            outcome, why = "out_of_memory", "killed by SIGKILL (the kernel's OOM killer)"
        else:
            outcome, why = "crash", f"the worker exited with status {rc}: {tail.strip().splitlines()[-1:] or ''}"
        info = {"outcome": outcome, "reason": f"{stage}: {why}", "worker_log_tail": tail}
        if stage in (None, "start", "build"):
            row["build"] = {"ok": False, "reason": why if outcome != "crash" else f"crash: {why}", **info}
        elif stage == "graphsel":
            row["graphsel"] = {**row["graphsel"], **info,
                               "outcome": {"crash": "raw_exception"}.get(outcome, outcome)}
            row["torch_pruning"] = {"outcome": "not_run", "reason": "the worker died in graphsel's stage"}
        else:
            row["torch_pruning"] = {**row["torch_pruning"], **info, "outcome": {"crash": "error"}.get(outcome, outcome)}
    if not row["build"].get("ok"):
        row["outcome"] = "build_failed"
    else:
        row["outcome"] = row["graphsel"].get("outcome")
    return row


def results_path(args) -> Path:
    return Path(args.out) / f"{common.result_stem(STEM, args.quick)}.json"


def too_large(spec: dict[str, Any], args) -> str | None:
    """A model whose fp32 parameters alone exceed the memory cap is not started."""
    if args.memory_gb and spec.get("params") and spec["params"] * 4 > args.memory_gb * 2**30:
        return (f"its {spec['params'] / 1e9:.2f} G parameters need {spec['params'] * 4 / 2**30:.1f} GiB in fp32, "
                f"more than the memory cap (--memory-gb {args.memory_gb:g})")
    return None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="8 models: 3 timm, 3 HuggingFace, 2 pytorchcv")
    ap.add_argument("--only", nargs="+", choices=ZOOS, help="run only these zoos")
    ap.add_argument("--limit", type=int, default=None, help="at most N models per zoo (after --resume's skipping)")
    ap.add_argument("--resume", action="store_true", help="skip the models already in the results file")
    ap.add_argument("--jobs", type=int, default=1, help="models in parallel (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cores / jobs)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per stage (build, graphsel, Torch-Pruning)")
    ap.add_argument("--memory-gb", type=float, default=8, help="address space a worker may add after its imports")
    ap.add_argument("--timm-per-family", type=int, default=1, help="the N smallest timm models per family")
    ap.add_argument("--refresh-catalog", action="store_true", help="recompute the catalog even if one is saved")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    _quiet()
    zoos = tuple(z for z in ZOOS if not args.only or z in args.only)
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    common.set_threads(threads)               # the environment line then names the workers' thread count
    path = results_path(args)
    old = json.loads(path.read_text()) if path.exists() else None

    # -- the catalog (saved in the results file; reused while the library versions match)
    cat = None
    if old and not args.refresh_catalog and old.get("catalog", {}).get("versions") == library_versions():
        cat = old["catalog"]
        missing = tuple(z for z in zoos if z not in cat["zoos"] and z not in cat.get("unavailable", {}))
        if missing:
            print(f"catalog: computing {', '.join(missing)}", flush=True)
            extra = build_catalog(missing, args.quick)
            cat["zoos"].update(extra["zoos"])
            cat.setdefault("unavailable", {}).update(extra["unavailable"])
        else:
            print(f"catalog: reused from {path}", flush=True)
    if cat is None:
        print("catalog: building every candidate on the meta device (parameter counts)", flush=True)
        cat = build_catalog(zoos, args.quick)

    # every zoo in the catalog (a resumed file may hold rows of zoos not run now): counts, order
    in_catalog = tuple(z for z in ZOOS if z in cat["zoos"])
    selection: dict[str, list[dict]] = {z: select(cat, z, args.timm_per_family, args.quick) for z in in_catalog}
    counts = {z: {**catalog_counts(cat, z), "selected": len(selection[z])} for z in in_catalog}
    for z in zoos:
        if z in cat.get("unavailable", {}):
            print(f"{z}: {cat['unavailable'][z]}")
        elif z in counts:
            c = counts[z]
            print(f"{z}: {c['candidates']} candidates, {c['built_on_meta']} built on meta, {c['eligible']} eligible, "
                  f"{c['families']} families → {c['selected']} models", flush=True)

    rows: list[dict] = list(old.get("models", [])) if (old and args.resume) else []
    done = {(r["zoo"], r["model"]) for r in rows}
    todo: list[dict] = []
    for z in zoos:
        pending = [e for e in selection.get(z, []) if (e["zoo"], e["model"]) not in done]
        todo += pending[: args.limit] if args.limit is not None else pending
    print(f"{len(todo)} model(s) to run ({len(done)} already in {path.name})" if args.resume
          else f"{len(todo)} model(s) to run", flush=True)

    config = {"passes": [list(p) if isinstance(p, tuple) else p for p in PASSES], "n_random_inputs": 1,
              "verify": True, "timeout_s": args.timeout, "memory_gb": args.memory_gb, "threads": threads,
              "jobs": args.jobs, "timm_per_family": args.timm_per_family, "quick": args.quick,
              "only": list(zoos), "limit": args.limit}
    results = {"config": config, "environment": {**common.environment(), "libraries": library_versions()},
               "catalog": cat, "counts": counts, "models": rows}
    order = {(e["zoo"], e["model"]): i for i, e in enumerate(m for z in ZOOS for m in selection.get(z, []))}
    lock = threading.Lock()

    def write():
        results["models"].sort(key=lambda r: order.get((r["zoo"], r["model"]), 10**9))
        results["totals"] = totals(results["models"])
        common.write_results(STEM, results, markdown(results), args.out, args.quick)

    def one(i_spec):
        i, e = i_spec
        spec = {**e, "timeout": args.timeout, "memory_gb": args.memory_gb, "threads": threads}
        why = e.get("catalog_error") and f"cannot be built from its default config: {e['catalog_error']}"
        why = why or too_large(spec, args)
        if why:
            row = {k: e[k] for k in ("zoo", "model", "family", "params", "input") if k in e}
            row.update(build={"ok": False, "reason": why}, graphsel={}, torch_pruning={}, outcome="build_failed",
                       wall_s=0.0)
        else:
            row = run_model(spec, args)
        g, t = row["graphsel"], row["torch_pruning"]
        with lock:
            rows.append(row)
            write()
            msg = (f"build failed: {row['build'].get('reason', '')[:150]}" if row["outcome"] == "build_failed" else
                   f"graphsel {g.get('outcome')}{' (' + g['reason'][:150] + ')' if g.get('outcome') != 'pruned_verified' and g.get('reason') else ''}"
                   f"; Torch-Pruning {t.get('outcome')}{' (' + t['reason'][:100] + ')' if t.get('reason') else ''}")
            print(f"[{i}/{len(todo)}] {row['zoo']} {row['model']} ({row['wall_s']:.0f} s): {msg}", flush=True)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as ex:
        list(ex.map(one, enumerate(todo, 1)))
    write()
    print(summary_line(results["totals"]))
    print(f"Wrote {results_path(args)} and .md")
    return results


# ============================================================================================
# totals and the report
# ============================================================================================

def totals(rows: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for zoo in ZOOS + ("all",):
        rs = [r for r in rows if zoo == "all" or r["zoo"] == zoo]
        if not rs:
            continue
        built = [r for r in rs if r["outcome"] != "build_failed"]
        gs = Counter(r["graphsel"].get("outcome") for r in built)
        tp = Counter(r["torch_pruning"].get("outcome") for r in built)
        n = len(built)
        out[zoo] = {"models": len(rs), "build_failed": len(rs) - n, "built": n,
                    "graphsel": {k: gs.get(k, 0) for k in GS_OUTCOMES},
                    "torch_pruning": {k: tp.get(k, 0) for k in TP_OUTCOMES + ("not_run",) if tp.get(k, 0) or k in TP_OUTCOMES},
                    "graphsel_pruned_verified_pct": round(100 * gs["pruned_verified"] / n, 1) if n else None,
                    "torch_pruning_pruned_pct": round(100 * tp["pruned"] / n, 1) if n else None}
    return out


def summary_line(tot: dict[str, Any]) -> str:
    a = tot.get("all")
    if not a:
        return "no models run"
    return (f"{a['built']} of {a['models']} models build and run; graphsel pruned and verified "
            f"{a['graphsel']['pruned_verified']} ({a['graphsel_pruned_verified_pct']} %), raw exceptions "
            f"{a['graphsel']['raw_exception']}; Torch-Pruning pruned {a['torch_pruning']['pruned']} "
            f"({a['torch_pruning_pruned_pct']} %)")


def reason_key(reason: str) -> str:
    """A reason with the model-specific parts (quoted names, numbers, shapes) blanked, for grouping."""
    s = re.sub(r"\(node [^)]*\)", "(node …)", reason)
    s = re.sub(r"'[^']*'", "'…'", s)
    s = re.sub(r"\"[^\"]*\"", "\"…\"", s)
    s = re.sub(r"\b\d+(\.\d+)?(e[-+]?\d+)?\b", "N", s)
    s = re.sub(r"\[[^\]]*\]", "[…]", s)
    return s[:220]


def grouped(rows: list[dict], pick: Callable[[dict], str | None]) -> list[tuple[str, int, list[str]]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        reason = pick(r)
        if reason:
            groups[reason_key(reason)].append(f"{r['zoo']}:{r['model']}")
    return sorted(((k, len(v), v) for k, v in groups.items()), key=lambda kv: (-kv[1], kv[0]))


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _reason_table(groups, title_col: str) -> str:
    return common.table([[_md_escape(k), n, ", ".join(v[:4]) + (f" (+{len(v) - 4})" if len(v) > 4 else "")]
                         for k, n, v in groups], [title_col, "models", "examples"])


def _ratio(before, after) -> str:
    if before is None or after is None:
        return "—"
    return f"{common.human(before)} → {common.human(after)} (×{after / before:.2f})" if before else "—"


def markdown(results: dict) -> str:
    cfg, env, rows, tot, counts = (results["config"], results["environment"], results["models"],
                                   results.get("totals") or totals(results["models"]), results["counts"])
    cat = results["catalog"]
    lines = [f"# Zoo sweep: the models users bring, pruned at 50 % by graphsel and Torch-Pruning"
             f"{' (quick smoke run)' if cfg['quick'] else ''}", ""]
    if "all" in tot:
        lines += [f"**{summary_line(tot)}.**", ""]
    lines += [
        "* graphsel: `graphsel.transform(model, [(\"prune\", {\"ratio\": 0.5}), \"fold_masks\", \"materialize\"], x, "
        "n_random_inputs=1)` with verification on (every pass checked; the slim model against the mask oracle). "
        "`pruned_verified`: verified and params or MACs reduced (`graphsel.cost`). Percentages are over the models "
        "that build and run (`build_failed` is the model's or the environment's failure, not graphsel's).",
        "* Torch-Pruning: `BasePruner`, `MagnitudeImportance(p=1)`, 50 % per layer, the classifier ignored, "
        "`num_heads` for `nn.MultiheadAttention`, timm's `qkv` attention and HuggingFace's `query`/`key`/`value` "
        "attention (head sizes patched after pruning, as in Torch-Pruning's examples), on a "
        "fresh copy with the same weights; `pruned`: a forward afterwards runs, the output's shape is unchanged and "
        "MACs or params went down (no reference to check the output against).",
        f"* Each model in its own process: {cfg['timeout_s']:.0f} s per stage (build, graphsel, Torch-Pruning), "
        f"{cfg['memory_gb']:g} GiB address space above the worker's imports, {cfg['threads']} torch thread(s), "
        f"{cfg['jobs']} job(s) in parallel. Random weights, nothing downloaded.",
        f"* {common.environment_line(env)} Libraries: "
        + ", ".join(f"{k} {v}" for k, v in env.get("libraries", {}).items()) + ".", "",
        "## The zoos", ""]
    zrows = []
    for z in ZOOS:
        if z in cat.get("unavailable", {}):
            zrows.append([z, "—", "—", "—", "—", cat["unavailable"][z]])
        elif z in counts:
            c = counts[z]
            errs = "; ".join(f"{k} ({n})" for k, n in c["catalog_errors"].items())
            zrows.append([z, c["candidates"], c["eligible"], c["families"], c["selected"], _md_escape(errs) or "—"])
    lines += [common.table(zrows, ["zoo", "candidates", "eligible", "families", "selected",
                                   "not buildable on meta (left out)"]), ""]
    if cfg["quick"]:
        lines += [f"Quick: timm families {', '.join(QUICK_TIMM_FAMILIES)}; pytorchcv families "
                  f"{', '.join(QUICK_PYTORCHCV_FAMILIES)}; the {QUICK_HF_SMALLEST} smallest HuggingFace architectures.", ""]
    lines += ["## Totals", ""]
    trows = []
    for z in ZOOS + ("all",):
        if z not in tot:
            continue
        t = tot[z]
        gs, tp = t["graphsel"], t["torch_pruning"]
        trows.append([z, t["models"], t["build_failed"], t["built"],
                      f"{gs['pruned_verified']} ({t['graphsel_pruned_verified_pct']} %)",
                      gs["verified_nothing_to_prune"], gs["graphsel_error"], gs["raw_exception"], gs["timeout"],
                      gs["out_of_memory"],
                      f"{tp['pruned']} ({t['torch_pruning_pruned_pct']} %)", tp["ran_nothing_pruned"],
                      tp["forward_failed"], tp["error"], tp["timeout"], tp["out_of_memory"]])
    lines += [common.table(trows, ["zoo", "models", "build failed", "built", "graphsel pruned+verified",
                                   "verified, nothing to prune", "GraphselError", "raw exception", "timeout", "OOM",
                                   "TP pruned (forward runs)", "TP nothing pruned", "TP forward failed", "TP error",
                                   "TP timeout", "TP OOM"]), ""]
    built = [r for r in rows if r["outcome"] != "build_failed"]
    sections = [
        ("graphsel: errors, raw exceptions, timeouts, out of memory (grouped by reason)",
         lambda r: (f"{r['graphsel']['outcome']}: {r['graphsel'].get('reason', '')}"
                    if r["graphsel"].get("outcome") not in ("pruned_verified", "verified_nothing_to_prune") else None)),
        ("graphsel: verified, nothing to prune (the top frozen reason)",
         lambda r: r["graphsel"].get("reason") if r["graphsel"].get("outcome") == "verified_nothing_to_prune" else None),
        ("Torch-Pruning: not pruned (grouped by reason)",
         lambda r: (f"{r['torch_pruning'].get('outcome')}: {r['torch_pruning'].get('reason', '')}"
                    if r["torch_pruning"].get("outcome") != "pruned" else None)),
    ]
    for title, pick in sections:
        g = grouped(built, pick)
        lines += [f"## {title}", "", _reason_table(g, "reason") if g else "None.", ""]
    g = grouped([r for r in rows if r["outcome"] == "build_failed"], lambda r: r["build"].get("reason"))
    lines += ["## Models that could not be built or run (not graphsel's fault; left out of the percentages)", "",
              _reason_table(g, "reason") if g else "None.", ""]
    # frozen reasons over all traced models: why graphsel leaves channels frozen
    fr: Counter[str] = Counter()
    for r in built:
        for line in r["graphsel"].get("frozen_report") or []:
            m = re.match(r"(\d+) group\(s\): (.*)", line)
            if m and not m.group(2).endswith("model output"):
                fr[reason_key(m.group(2))] += 1
    if fr:
        lines += ["## Frozen-channel reasons (number of models whose frozen report names it)", "",
                  common.table([[_md_escape(k), n] for k, n in fr.most_common(25)], ["reason", "models"]), ""]
    lines += ["## Every model", ""]
    mrows = []
    for r in rows:
        g, t = r["graphsel"], r["torch_pruning"]
        if r["outcome"] == "build_failed":
            mrows.append([r["zoo"], r["model"], r["family"], common.human(r.get("params")),
                          "×".join(map(str, r.get("input", []))), "build failed: " + _md_escape(r["build"].get("reason", ""))[:120],
                          "", "", "", "", "", "", f"{r.get('wall_s', 0):.0f}"])
            continue
        gtxt = g.get("outcome") or "—"
        if g.get("outcome") != "pruned_verified" and g.get("reason"):
            gtxt += ": " + _md_escape(g["reason"])[:120]
        ttxt = t.get("outcome") or "—"
        if t.get("outcome") not in ("pruned",) and t.get("reason"):
            ttxt += ": " + _md_escape(t["reason"])[:100]
        mrows.append([r["zoo"], r["model"], r["family"], common.human(r.get("params")),
                      "×".join(map(str, r.get("input", []))), gtxt,
                      _ratio(g.get("macs_before"), g.get("macs_after")),
                      f"{g['frozen_share']:.0%}" if g.get("frozen_share") is not None else "—",
                      str(g.get("leafed", "—")) + (" · specialised" if g.get("specialised") else ""),
                      f"{g.get('seconds', 0):.0f}", ttxt, _ratio(t.get("macs_before"), t.get("macs_after")),
                      f"{r.get('wall_s', 0):.0f}"])
    lines.append(common.table(mrows, ["zoo", "model", "family", "params", "input", "graphsel", "MACs",
                                      "frozen share", "leafed", "graphsel s", "Torch-Pruning", "TP MACs",
                                      "wall s"]))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    r = main()
    sys.exit(r if isinstance(r, int) else 0)
