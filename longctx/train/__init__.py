"""Progressive long-sequence fine-tuning: config, packed data, chunked loss, the loop, checkpoints.

- `config.py`: the YAML config as dataclasses, validated with one-line errors;
- `data.py`: documents (files, a hub dataset, or synthetic passkey prompts from longctx/tasks/)
  packed into rows with restarting position_ids and shifted labels;
- `loss.py`: the chunked cross-entropy (no [seq, vocab] logits) and the trained module;
- `loop.py`: stages of growing length, each with its rope settings (`run_training`, one `run_stage`);
- `distributed.py`: torchrun's environment, the (dp, sp) mesh, FSDP2 sharding;
- `checkpoint.py`: `TrainState`, resumable states and the model directory of each stage; `api.py`: the entry points.

Imports: parallel, rope, tasks, models, labels, units, errors; never eval/ or lora/.
"""
