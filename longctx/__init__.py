"""longctx: extend the context window of RoPE language models and carry it between models as LoRA adapters."""

__version__ = "0.1.0"

from longctx.errors import LongctxError

__all__ = ["LongctxError", "__version__"]
