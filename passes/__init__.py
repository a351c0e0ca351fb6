"""The graphsel pass library (installed as ``graphsel.passes``): the generic passes and one
subpackage per method. Importing it registers every pass by name."""
from .fuse_bn import FuseBatchNorm
from .fold_weight_std import FoldWeightStd
from .prune import Prune
from .fold_masks import FoldMasks
from .materialize import Materialize
from . import selective_conv, dynamic_group_conv  # noqa: F401 - the method packages' public modules
from .sconv import InsertSelectiveConv, LowerSelectiveConv
from .dgc import ApplyDynamicGroupConv
from .bsn import BSNExtract, BudgetGates
from .dcp import DiscriminationAwarePruning

__all__ = ["FuseBatchNorm", "FoldWeightStd", "Prune", "FoldMasks", "Materialize", "InsertSelectiveConv", "LowerSelectiveConv",
           "ApplyDynamicGroupConv", "BudgetGates", "BSNExtract", "DiscriminationAwarePruning", "selective_conv",
           "dynamic_group_conv"]
