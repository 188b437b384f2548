"""Evaluation: needle-in-a-haystack grids and perplexity by length, on a loaded model.

- `engine.py`: the model-side work: chunked prefill, the reused haystack KV prefix, greedy answers
  (the expected answer verified as a draft), teacher forcing, the memory check;
- `cache.py`: a prompt's KV cache in one process (layers that write in place, cropped copies);
- `sharded.py`: a prompt's KV cache sharded across the ranks of a process group, and
  `longctx_sharded`, the attention over it (`longctx needle --sequence-parallel P`);
- `attention.py`: `longctx_cached`, attention on top of a KV cache without a mask (CPU sdpa models);
- `runner.py`: one (length, depth, sample) cell scored (`Evaluator`), and `passkey_accuracy`;
- `scoring.py`: the answer-scoring rules; `grid.py`: a resumable lengths x depths run and its files;
- `suite.py`: RULER's suite (tasks x lengths x samples), its table and effective length;
- `heatmap.py`: the depth x length figure; `perplexity.py`: perplexity by context length.
The prompts, haystacks and tasks it evaluates live in longctx/tasks/ (training builds the same ones).

Imports: tasks, attention, rope, models, units, errors; never train/ or lora/.
"""

from longctx.eval.runner import Evaluator, passkey_accuracy

__all__ = ["Evaluator", "passkey_accuracy"]
