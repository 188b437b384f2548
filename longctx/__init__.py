"""longctx: extend the context window of RoPE language models and carry it between models as LoRA adapters.

Importing longctx imports neither torch nor transformers. It registers longctx's attention
implementations (`longctx_self_extend`) with transformers: at once if transformers' modeling
code is already loaded, otherwise the moment it loads (an import hook), so that
`from_pretrained(..., attn_implementation="longctx_self_extend")` works whichever of the two
packages a user imports first.
"""

import importlib.abc
import importlib.machinery
import sys

from longctx.errors import LongctxError
from longctx.version import __version__

__all__ = ["LongctxError", "__version__"]

_TRANSFORMERS_MODELING = "transformers.modeling_utils"


def register_attention_implementations() -> None:
    from longctx.models.self_extend import register_with_transformers

    register_with_transformers()


class _RegisterAfterTransformersLoads(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of transformers.modeling_utils so that the
    registration runs right after that module has executed, then steps aside."""

    def find_spec(self, name, path, target=None):
        if name != _TRANSFORMERS_MODELING:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            register_attention_implementations()

        spec.loader.exec_module = exec_then_register
        return spec


if _TRANSFORMERS_MODELING in sys.modules:
    register_attention_implementations()
elif not any(isinstance(finder, _RegisterAfterTransformersLoads) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformersLoads())
