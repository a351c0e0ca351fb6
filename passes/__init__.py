"""The graphsel pass library (installed as ``graphsel.passes``). Importing it registers every pass."""
from .fuse_bn import FuseBatchNorm
from .prune import Prune
from .fold_masks import FoldMasks
from .materialize import Materialize
from . import selective_conv  # noqa: F401
from . import dynamic_group_conv  # noqa: F401

__all__ = ["FuseBatchNorm", "Prune", "FoldMasks", "Materialize"]
