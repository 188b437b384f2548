"""The label convention of causal-LM training that data packing, sharding and the losses share.

Labels travel already shifted: labels[i] is the target of position i (the next token of the
same document), and IGNORE_INDEX marks a position with no target (a document's last token,
padding, the prompt when only the answer is trained). -100 is PyTorch's default
cross-entropy ignore_index and the value transformers uses, so tensors built here go to
their losses unchanged.
"""

IGNORE_INDEX = -100
