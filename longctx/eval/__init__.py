"""Evaluation: needle-in-a-haystack grids (haystacks, tasks, prompts, scoring, heatmap) and perplexity by length."""

from longctx.eval.runner import Evaluator, passkey_accuracy

__all__ = ["Evaluator", "passkey_accuracy"]
