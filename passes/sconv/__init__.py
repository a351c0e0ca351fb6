"""Selective convolution (methods.md §1), split by job; the public API is re-exported by
``graphsel.passes.selective_conv``."""
