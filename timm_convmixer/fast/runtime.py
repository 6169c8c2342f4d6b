"""What the runtime is doing around a block call, read in one place for every fast path: autocast, and whether
Triton's CPU interpreter was asked for. Imports nothing beyond torch, so every path module can use it."""
import os
from typing import Tuple

import torch

__all__ = ['autocast_state', 'interpreter_enabled']


def autocast_state(device_type: str) -> Tuple[str, bool, torch.dtype]:
    """``(device_type, enabled, dtype)`` of autocast for ``device_type`` (torch >= 2.4 API, older fallback)."""
    try:
        return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # torch < 2.4
        if device_type == 'cpu':
            return device_type, torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        return device_type, torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()


def interpreter_enabled() -> bool:
    """CPU tensors may take the Triton paths only when the interpreter is asked for explicitly (tests)."""
    return os.environ.get('TRITON_INTERPRET', '0') == '1'
