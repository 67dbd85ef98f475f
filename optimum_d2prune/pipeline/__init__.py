"""The pruning pipeline: block-0 capture, the block loop over each stack (`engine`), and what it needs."""
