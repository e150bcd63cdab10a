from .packed_linear import PackedLinear

__all__ = ["PackedLinear"]
