"""lm-eval task configs (YAML) reading local copies of the 7 zero-shot tasks of the pruning papers."""
