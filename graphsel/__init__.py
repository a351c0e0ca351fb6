"""graphsel: a channel-level graph compiler for PyTorch.

``graphsel.transform(model, passes=[...])`` traces any model with torch.fx and runs composable,
verified passes over it; ``graphsel.report(gm)`` shows what each pass did.
"""
from graphsel.errors import ExampleInputError, FunctionChangedError, GraphselError, MaskError, PassError, TraceError
from graphsel.ir.meta import GraphselMeta, graphsel_meta
from graphsel.pipeline.passbase import Contract, Diagnostic, Pass, PassResult
from graphsel.pipeline.context import PassContext, register_analysis
from graphsel.pipeline.registry import available_passes, register_pass, resolve_pass, resolve_passes
from graphsel.ir.tracing import register_leaf_module, trace
from graphsel.analysis.patterns import Optional, Pattern
from graphsel.pipeline.phases import transform
from graphsel.pipeline.report import report
from graphsel.analysis.cost import cost
from graphsel.tools.export import ExportError, ExportResult, export
from graphsel.tools.zoo import ModelSpecError, load_model, save

__version__ = "0.1.0"

__all__ = [
    "trace", "transform", "report", "cost", "Pass", "PassResult", "PassContext", "Contract", "Diagnostic",
    "register_pass", "register_leaf_module", "register_analysis", "available_passes", "resolve_pass",
    "resolve_passes", "Pattern", "Optional", "GraphselError", "TraceError", "PassError",
    "FunctionChangedError", "MaskError", "ExampleInputError", "GraphselMeta", "graphsel_meta",
    "export", "ExportResult", "ExportError", "load_model", "save", "ModelSpecError",
]
