"""LoRA adapters: extract one from a model pair, merge adapters into a model, combine them.

What lives where (PEFT's split: on-disk format, config and layer math, the operations):
  adapter_format  PEFT's files: names, tensor keys (the LORA_PARTS table), config fields, the
                  rank_pattern rule for the adapters we write; imports neither torch nor peft
  adapter         an adapter in memory: its config read through peft.LoraConfig, per-module
                  rank/alpha/scaling, LoraFactors and their delta math, the rope settings it carries
  lowrank         the factorization maths (randomized and exact SVD, energy ranks, measured error)
  extract         extract-lora: checks, the pass over tensor pairs, the report and sidecar
  mergekit        extract-lora --engine mergekit (mergekit-extract-lora in a subprocess)
  measure         the error of any adapter against the pair it came from
  threads         the ordered parallel map under a memory budget, torch's CPU thread count
  merge           merge-adapters into a model: the merge plan (ties, modules_to_save), streamed
  combine         merge-adapters --combine: several adapters into one (cat, svd, ties, dare)
  choices         the flag values the commands list without importing torch
Imports point down: lora may use longctx.models and longctx.rope, never train, eval or commands.
"""
