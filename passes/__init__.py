"""The graphsel pass library (installed as ``graphsel.passes``): the generic passes and one
subpackage per method. Importing it registers every pass by name."""
from .fuse_bn import FuseBatchNorm
from .prune import Prune
from .fold_masks import FoldMasks
from .materialize import Materialize
from . import selective_conv, dynamic_group_conv  # noqa: F401 - the method packages' public modules
from .sconv import InsertSelectiveConv, LowerSelectiveConv
from .dgc import ApplyDynamicGroupConv

__all__ = ["FuseBatchNorm", "Prune", "FoldMasks", "Materialize", "InsertSelectiveConv", "LowerSelectiveConv",
           "ApplyDynamicGroupConv", "selective_conv", "dynamic_group_conv"]
