"""What training data and evaluation both build: haystacks, retrieval tasks, prompts of exact length.

- `haystacks.py`: haystack text (noise, essays, files, datasets) and its tokens with sentence boundaries;
- `retrieval.py`: the tasks (passkey, gkamradt's needle, RULER's NIAH family): needles, question, answer;
- `prompts.py`: prompts of exactly L tokens with the needles at a depth, raw or in the chat template;
- `ruler.py`: RULER's 13 tasks (templates, samples, QA files) and prompts fitted to a length.

`longctx train`'s synthetic passkey data and `longctx needle` build the same prompts from here.
Scoring, grids and the model-side engine are evaluation-only and live in longctx/eval/.

Imports: longctx.errors only (tokenizers are passed in; `datasets` lazily for data files), never train/ or eval/.
"""
