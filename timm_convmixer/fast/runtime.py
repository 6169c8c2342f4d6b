"""What the runtime is doing around a block call, read in one place for every fast path: autocast, and whether
Triton's CPU interpreter was asked for; and the row view of an activation that every kernel path takes. Imports
nothing beyond torch, so every path module can use it."""
import os
from typing import Optional, Tuple

import torch

__all__ = ['AUTOCAST_DTYPES', 'TRITON_DTYPES', 'autocast_state', 'conv_dtype', 'interpreter_enabled', 'rows',
           'triton_device']

AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what autocast casts (it leaves fp64 alone)
# what the Triton kernels take (fp64 too: the interpreter tests compare against it)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def autocast_state(device_type: str) -> Tuple[str, bool, torch.dtype]:
    """``(device_type, enabled, dtype)`` of autocast for ``device_type`` (torch >= 2.4 API, older fallback)."""
    try:
        return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # torch < 2.4
        if device_type == 'cpu':
            return device_type, torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        return device_type, torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()


def conv_dtype(x: torch.Tensor, autocast: Optional[Tuple[bool, torch.dtype]] = None) -> torch.dtype:
    """The dtype a convolution of ``x`` computes in, which is also the dtype the plain block returns (its last
    BatchNorm keeps the pointwise conv's): autocast's where autocast casts ``x``, else ``x``'s. ``autocast``: an
    ``(enabled, dtype)`` pair to use instead of the current state (a compiled node's, fixed when it was traced)."""
    enabled, dtype = autocast if autocast is not None else autocast_state(x.device.type)[1:]
    return dtype if enabled and x.dtype in AUTOCAST_DTYPES else x.dtype


def interpreter_enabled() -> bool:
    """CPU tensors may take the Triton paths only when the interpreter is asked for explicitly (tests)."""
    return os.environ.get('TRITON_INTERPRET', '0') == '1'


def triton_device(x: torch.Tensor, allow_interpreter: Optional[bool] = None) -> bool:
    """Whether ``x`` is where the Triton kernels run: CUDA, or the CPU through the interpreter (asked for with
    ``TRITON_INTERPRET=1``, or ``allow_interpreter``)."""
    if x.device.type == 'cuda':
        return True  # (first: a block's call on a GPU reads no environment variable)
    if x.device.type != 'cpu':
        return False
    return interpreter_enabled() if allow_interpreter is None else allow_interpreter


def rows(t: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` -> its ``[N*H*W, C]`` NHWC rows, what the row kernels and the GEMMs over rows take (a view of
    a channels_last tensor, a copy otherwise)."""
    N, C, H, W = t.shape
    return t.permute(0, 2, 3, 1).reshape(N * H * W, C)
