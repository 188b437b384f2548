"""Progressive long-sequence fine-tuning: config, packed data, chunked loss, the loop, checkpoints."""
