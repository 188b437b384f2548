"""Length-dependent rope (dynamic NTK, LongRoPE) rotated the way transformers' own `generate` rotates it.

For these types transformers' rotary embedding picks its frequencies from the length of the
forward pass it is given (its largest position + 1), and keeps state between passes: a dynamic
base grows with the longest pass seen and resets when a pass is shorter than the native length.
`generate` prefills a prompt of L tokens in one pass, so every prompt token is rotated with the
frequencies of length L; each decode step then rotates its one new token with those of L + 1,
L + 2, ... The evaluation engine prefills in chunks (to bound memory) and runs many prompts
through one model, which would rotate early chunks with the native base and make each prompt
depend on the ones before it.

`rotation_for_length(model, L)` puts every length-dependent rotary module in the state a fresh
model reaches after one pass of L tokens (by transformers' own update), holds it for the block,
and leaves it there, so the decode steps after the block grow it exactly as `generate` does.
"""

from __future__ import annotations

import contextlib

import torch

from longctx.rope.methods import LENGTH_DEPENDENT_TYPES

HELD = "default"  # a rope_type transformers' update leaves alone


def length_dependent_rotary_modules(model) -> list[torch.nn.Module]:
    return [
        module for module in model.modules()
        if hasattr(module, "original_inv_freq") and getattr(module, "rope_type", None) in LENGTH_DEPENDENT_TYPES
    ]


def _fresh_state(module) -> None:
    """The state transformers' rotary embedding has right after construction."""
    if not hasattr(module, "_longctx_initial_scaling"):
        module._longctx_initial_scaling = module.attention_scaling
    # a clone: longrope's update writes into inv_freq in place, which must never reach original_inv_freq
    module.register_buffer("inv_freq", module.original_inv_freq.clone(), persistent=False)
    module.max_seq_len_cached = module.original_max_seq_len
    module.attention_scaling = module._longctx_initial_scaling


@contextlib.contextmanager
def rotation_for_length(model, length: int):
    """Inside the block, every pass rotates as one pass of `length` tokens on a fresh model would."""
    modules = length_dependent_rotary_modules(model)
    held = []
    try:
        for module in modules:
            _fresh_state(module)
            probe = torch.zeros(1, 1, 1, device=module.inv_freq.device)
            module(probe, torch.tensor([[length - 1]], device=probe.device))  # transformers' update for this length
            held.append((module, module.rope_type))
            module.rope_type = HELD
        yield
    finally:
        for module, rope_type in held:
            module.rope_type = rope_type
