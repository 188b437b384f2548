"""The KV cache of a prompt held whole by one process: DynamicCache layers that write in place.

`new_cache(capacity)` reserves room for a whole prompt and its answer, so decode steps do not copy
the cache; `continued_cache` hands a prompt the reused haystack prefix read in place (for an
attention that takes it as a block of its own, eval/attention.py), `cropped_copy` as a copy
(for any other attention).
(The cache split across the ranks of a process group is sharded.py's.)

`keep_heap_small()` stops glibc from keeping freed cache buffers and activations in its heap
(see there): without it, a rank evaluating 16K tokens held ~330 MB more than its live tensors.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import torch


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 128 * 1024  # glibc's own default (and starting) threshold


@functools.cache
def keep_heap_small() -> bool:
    """Fix glibc's mmap threshold at its default 128 KiB, so that every tensor larger than that is an
    mmap of its own, unmapped when freed; True where that was done (glibc), False elsewhere.

    glibc raises the threshold (up to 32 MiB) each time a mapped block is freed, and loading a model
    frees many; from then on the KV cache buffers and a chunk's activations (0.1-32 MiB each) come
    from the brk heap, whose freed holes stay resident: outgrown cache buffers and the last chunk's
    scratch, ~330 MB of a rank's 16K peak (benchmarks/RESULTS.md). Fixing the threshold turns the
    adjustment off (as MALLOC_MMAP_THRESHOLD_ would). Once per process; the loaded weights stay put."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


@functools.cache
def reserved_layer_class():
    """The ReservedLayer class (made on first use: transformers is imported lazily)."""
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        """A DynamicLayer that writes new keys and values in place into buffers with room ahead.

        DynamicLayer concatenates on every update, so each decode step copies the whole cache
        into fresh memory. Here `keys`/`values` are views of the filled part of two buffers of
        `capacity` positions (the length the caller expects), doubled if they run out.
        """

        def __init__(self, capacity: int = 0):
            super().__init__()
            self.capacity = capacity
            self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            length = self.held()
            end = length + key_states.shape[-2]
            if self.buffers is None or end > self.buffers[0].shape[-2] or not self._views_of_buffers():
                self._reserve(key_states, max(end, self.capacity, 2 * length))
            key_buffer, value_buffer = self.buffers
            key_buffer[..., length:end, :].copy_(key_states)
            value_buffer[..., length:end, :].copy_(value_states)
            self.keys, self.values = key_buffer[..., :end, :], value_buffer[..., :end, :]
            return self.keys, self.values

        def keep_first(self, length: int) -> None:
            """Drop every position this layer holds from `length` on; the buffers keep their room."""
            self.keys, self.values = self.keys[..., :length, :], self.values[..., :length, :]

        def held(self) -> int:
            """The positions this layer holds itself (a BasedLayer's get_seq_length counts its base too)."""
            return self.keys.shape[-2] if self.is_initialized and self.keys.numel() else 0

        def _views_of_buffers(self) -> bool:
            """False once something (batch selection, say) has replaced keys with a tensor of its own."""
            return self.keys.numel() == 0 or (
                self.keys.data_ptr() == self.buffers[0].data_ptr() and self.keys.shape[:2] == self.buffers[0].shape[:2]
            )

        def _reserve(self, like: torch.Tensor, capacity: int) -> None:
            batch, heads, _, head_dim = like.shape
            length = self.held()
            buffers = tuple(like.new_empty(batch, heads, capacity, head_dim) for _ in range(2))
            if length:
                buffers[0][..., :length, :].copy_(self.keys)
                buffers[1][..., :length, :].copy_(self.values)
            self.buffers = buffers

    return ReservedLayer


@functools.cache
def based_cache_class():
    """The BasedCache class (made on first use: transformers is imported lazily)."""
    from transformers import DynamicCache

    class BasedLayer(reserved_layer_class()):
        """A ReservedLayer after a base of `offset` positions it does not hold (another cache's, read in
        place): positions and mask sizes count the base, keys/values are only this layer's own."""

        def __init__(self, capacity: int = 0, offset: int = 0):
            super().__init__(capacity)
            self.offset = offset

        def get_seq_length(self) -> int:
            return self.offset + self.held()

    class BasedCache(DynamicCache):
        """A prompt's cache that starts with another cache's first positions, read in place.

        `base` is, per layer, (keys, values) views of the first `offset` positions of the cache it
        continues; each layer holds only what comes after them, and an attention that knows (eval/
        attention.py's `longctx_cached`, given the base as the `longctx_base` keyword) takes the
        base as one more block of keys. The base is never written: the cache it views must only
        grow while this one is in use (as the engine's prefix cache does)."""

        def __init__(self, base: tuple, capacity: int = 0):
            super().__init__()
            self.base, self.offset = base, base[0][0].shape[-2]
            own = max(capacity - self.offset, 0)
            self.layer_class_to_replicate = functools.partial(BasedLayer, own, self.offset)
            self.layers.extend(self.layer_class_to_replicate() for _ in base)

        def keep_first(self, length: int) -> None:
            """Drop every position from `length` on (the base's too, if `length` is shorter)."""
            if length < self.offset:
                self.base = tuple((keys[..., :length, :], values[..., :length, :]) for keys, values in self.base)
                self.offset = length
            for layer in self.layers:
                layer.offset = self.offset
                if layer.held():
                    layer.keep_first(length - self.offset)

    return BasedCache


def continued_cache(cache, length: int, capacity: int = 0):
    """A new cache (BasedCache) that starts with the first `length` positions of `cache`, read in
    place, not copied, with room for `capacity` positions in all; an empty `new_cache(capacity)`
    for length 0. Only an attention that takes the base can run on it (see BasedCache)."""
    if not length:
        return new_cache(capacity)
    base = tuple((layer.keys[..., :length, :], layer.values[..., :length, :]) for layer in cache.layers)
    return based_cache_class()(base, capacity)


def is_based(cache) -> bool:
    return isinstance(cache, based_cache_class())


def new_cache(capacity: int = 0):
    """An empty DynamicCache whose layers write in place into buffers of `capacity` positions
    (a whole prompt and its answer, when known), grown by doubling beyond it."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layer_class_to_replicate = functools.partial(reserved_layer_class(), capacity)
    return cache


def cropped_copy(cache, length: int, capacity: int = 0):
    """A new cache (as `new_cache(capacity)`) holding a copy of the first `length` positions of
    `cache`, which is left untouched."""
    copy = new_cache(capacity)
    if length:
        for layer in cache.layers:
            copy.layers.append(copy.layer_class_to_replicate())
            copy.layers[-1].update(layer.keys[..., :length, :], layer.values[..., :length, :])
    return copy


def cache_keyword(model) -> str:
    """The forward keyword that takes a KV cache: `cache` in transformers >= 5.24, which deprecates
    `past_key_values` (removal in 5.40), and `past_key_values` in the 5.x releases before it."""
    return _cache_keyword(type(model))


@functools.cache
def _cache_keyword(model_class) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"
