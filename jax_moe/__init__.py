"""jax_moe: Mixture-of-Experts kernels for JAX, with dense and GGUF-quantized experts.

``moe_matmul`` applies each token's routed experts (CPU and CUDA); ``QuantizedExperts``,
``quantize`` and ``dequantize`` hold and convert GGUF-quantized expert weights; ``route`` and
``moe_ffn`` / ``moe_block`` build whole MoE blocks. Flax modules live in ``jax_moe.nnx`` and
``jax_moe.linen``, GGUF checkpoint loading in ``jax_moe.gguf`` (optional extras).
"""

from ._ext import build_info
from .ffn import MoEWeights, SharedExpert, fuse_gate_up, moe_block, moe_ffn
from .kinds import GGMLType, MoeKind, WeightLayout
from . import parallel, partitioning
from .parallel import ExpertParallel, expert_parallel_ffn
from .explain import explain
from .ops import check_routing, moe_matmul
from .primitive import InferenceOnlyError, moe_matmul_p
from .quantized import QuantizedExperts, dequantize, quantize
from .routing import RouterConfig, route

__version__ = "0.1.0"

__all__ = [
    "ExpertParallel",
    "GGMLType",
    "InferenceOnlyError",
    "MoEWeights",
    "MoeKind",
    "QuantizedExperts",
    "RouterConfig",
    "SharedExpert",
    "WeightLayout",
    "build_info",
    "check_routing",
    "dequantize",
    "expert_parallel_ffn",
    "explain",
    "fuse_gate_up",
    "moe_block",
    "moe_ffn",
    "moe_matmul",
    "moe_matmul_p",
    "quantize",
    "route",
]
