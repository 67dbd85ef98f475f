"""Pruning methods: each one owns its options, its solvers and its plan for a block (`base.PruningMethod`).

Kept light: importing `optimum_d2prune.methods.options` (the command line does, to build its flags) must not
import torch. The built-in methods register themselves when `registry.registered_methods()` first runs.
"""
