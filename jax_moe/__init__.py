"""jax_moe: Mixture-of-Experts kernels for JAX, with dense and GGUF-quantized experts.

``moe_matmul`` applies each token's routed experts (CPU and CUDA); ``QuantizedExperts``,
``quantize`` and ``dequantize`` hold and convert GGUF-quantized expert weights.
"""

from ._ext import build_info
from .kinds import GGMLType, MoeKind, WeightLayout
from .ops import moe_matmul
from .primitive import InferenceOnlyError, moe_matmul_p
from .quantized import QuantizedExperts, dequantize, quantize

__version__ = "0.1.0"

__all__ = [
    "GGMLType",
    "InferenceOnlyError",
    "MoeKind",
    "QuantizedExperts",
    "WeightLayout",
    "build_info",
    "dequantize",
    "moe_matmul",
    "moe_matmul_p",
    "quantize",
]
