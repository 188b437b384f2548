"""The values the LoRA commands' flags accept, kept apart from the code that imports torch so
that the command line lists them while `longctx --help` stays fast. What each value does is
in longctx.lora.combine (COMBINE_METHODS) and longctx.lora.extract (the policies)."""

COMBINE_METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")  # merge-adapters --combine
EMBEDDING_POLICIES = ("full", "lora", "skip")  # extract-lora --embeddings
VOCAB_POLICIES = ("error", "keep-base")  # extract-lora --vocab-policy
