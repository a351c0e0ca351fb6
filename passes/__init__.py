"""The graphsel pass library (installed as ``graphsel.passes``). Importing it registers every pass."""
from .fuse_bn import FuseBatchNorm

__all__ = ["FuseBatchNorm"]
