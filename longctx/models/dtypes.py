"""The floating dtypes that --dtype and --precision flags name, and their torch dtypes.

Importing this module does not import torch, so a command's argparse `choices` can use
the names while `longctx --help` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of one of DTYPE_NAMES (callers validate user input against DTYPE_NAMES first)."""
    import torch

    if name not in DTYPE_NAMES:
        raise ValueError(f"{name!r} is not one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: the name configs and flags use."""
    return str(dtype).removeprefix("torch.")
