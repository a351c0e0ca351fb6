"""The graphsel pass library (installed as ``graphsel.passes``). Importing it registers every pass."""
from .fuse_bn import FuseBatchNorm
from . import selective_conv  # noqa: F401
from . import dynamic_group_conv  # noqa: F401

__all__ = ["FuseBatchNorm"]
