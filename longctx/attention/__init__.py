"""Blockwise attention math shared by the ring and the evaluation engine.

`blocks.py`: attention of one (query block, key/value block) pair with its log-sum-exp, the
log-sum-exp merge of partial results, their backward, and the choice of PyTorch kernel for a
device and dtype. parallel/ring.py and eval/attention.py build on it.

Imports: nothing from longctx (torch only), so every package above may use it.
"""
