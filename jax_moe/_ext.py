"""Loads the compiled modules and registers their FFI targets with JAX (once, at import)."""

from __future__ import annotations

from types import ModuleType

import jax

from . import _jax_moe_cpu

TARGET = "jax_moe_matmul"

_jax_moe_cuda: ModuleType | None
try:
    from . import _jax_moe_cuda  # type: ignore[no-redef]
except ImportError:  # built without CUDA
    _jax_moe_cuda = None

for _name, _capsule in _jax_moe_cpu.registrations().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")
if _jax_moe_cuda is not None:
    for _name, _capsule in _jax_moe_cuda.registrations().items():
        jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA")

cpu = _jax_moe_cpu
cuda = _jax_moe_cuda


def build_info() -> dict:
    """What this installation was built with.

    Returns a dict with ``cuda`` (bool: the CUDA module is built), ``cuda_architectures``
    (list of SM versions such as ``[80, 90]``), ``cuda_sm90a`` (bool: the build has
    Hopper's wgmma GEMM, used on compute capability 9.0 devices), ``cuda_runtime_version`` (int or None),
    ``ffi_api_version`` ((major, minor) of the XLA FFI headers built against) and ``kinds``
    ({platform: [kind names]} for the platforms this build can run).
    """
    kinds = ["SCALAR_GGUF", "WMMA", "WMMA_GGUF"]
    info = {
        "cuda": cuda is not None,
        "cuda_architectures": [],
        "cuda_sm90a": False,
        "cuda_runtime_version": None,
        "ffi_api_version": tuple(cpu.ffi_api_version()),
        "kinds": {"cpu": list(kinds)},
    }
    if cuda is not None:
        info["cuda_architectures"] = [int(a) for a in cuda.architectures()]
        info["cuda_sm90a"] = bool(cuda.has_sm90a())
        info["cuda_runtime_version"] = int(cuda.runtime_version())
        info["kinds"]["cuda"] = list(cuda.kinds())
    return info
