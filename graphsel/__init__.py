"""graphsel: a channel-level graph compiler for PyTorch.

``graphsel.transform(model, passes=[...])`` traces any model with torch.fx and runs composable,
verified passes over it; ``graphsel.report(gm)`` shows what each pass did. The package is built
in layers (the README's Architecture section): ``ir`` (tracing, copying, shapes) ← ``ops`` (the operator table)
← ``analysis`` (channels, masks, cost) ← ``pipeline`` (passes, transform, verification, oracle)
← ``passes`` ← ``tools`` (CLI, model loading, export). This module is the public face of all of
them.
"""
from graphsel.version import __version__
from graphsel.errors import (DistributedError, ExampleInputError, FunctionChangedError, GraphselError, MaskError,
                             PassError, ReplicaMismatchError, TraceError)
from graphsel import distributed
from graphsel.distributed import assert_replicas_equal
from graphsel.ir.meta import GraphselMeta, graphsel_meta
from graphsel.ir.tracing import register_leaf_module, trace
from graphsel.ops import OpSpec, register_op
from graphsel.analysis.channels import ChannelAnalysis, ChannelGroup, analyze_channels
from graphsel.analysis.cost import CostReport, cost
from graphsel.analysis.masks import ChannelMasks, add_consumer_mask, add_group_mask, clear_masks, get_masks
from graphsel.analysis.patterns import Optional, Pattern
from graphsel.pipeline.passbase import Contract, Diagnostic, Pass, PassResult
from graphsel.pipeline.context import PassContext, register_analysis
from graphsel.pipeline.registry import available_passes, register_pass, resolve_pass, resolve_passes
from graphsel.pipeline.select import ModuleSelection
from graphsel.pipeline.oracle import oracle_forward
from graphsel.pipeline.phases import transform
from graphsel.pipeline.report import report
from graphsel import passes  # noqa: F401 - registers the built-in passes
from graphsel.tools.export import ExportError, ExportResult, export
from graphsel.tools.runtimes import RuntimeTable, benchmark_runtimes
from graphsel.analysis.latency import LatencyTable, RuntimeUnavailable
from graphsel.tools.checkpoint import CheckpointError
from graphsel.tools.zoo import ModelSpecError, UntrustedFileError, load_model, save

__all__ = [
    # trace and transform
    "trace", "transform", "report", "register_leaf_module",
    # passes
    "Pass", "PassResult", "PassContext", "Contract", "Diagnostic", "register_pass", "register_analysis",
    "available_passes", "resolve_pass", "resolve_passes", "ModuleSelection", "Pattern", "Optional",
    # the operator table
    "OpSpec", "register_op",
    # channels, masks, costs
    "analyze_channels", "ChannelAnalysis", "ChannelGroup", "ChannelMasks", "add_group_mask",
    "add_consumer_mask", "get_masks", "clear_masks", "oracle_forward", "cost", "CostReport",
    # deploy
    "export", "ExportResult", "load_model", "save", "benchmark_runtimes", "RuntimeTable", "LatencyTable",
    "RuntimeUnavailable",
    # torch.distributed (graphsel.distributed holds the rest)
    "distributed", "assert_replicas_equal",
    # errors and metadata
    "GraphselError", "TraceError", "PassError", "FunctionChangedError", "MaskError", "ExampleInputError",
    "ExportError", "ModelSpecError", "UntrustedFileError", "CheckpointError", "DistributedError",
    "ReplicaMismatchError", "GraphselMeta", "graphsel_meta", "__version__",
]
