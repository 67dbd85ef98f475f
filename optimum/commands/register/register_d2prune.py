"""Registers `optimum-cli d2prune` (optimum discovers every module of the `optimum.commands.register` namespace
package; this folder must not contain an `__init__.py`). Only light imports here: optimum-cli loads this file at
every start."""

from optimum_d2prune.commands import D2PruneCommand

REGISTER_COMMANDS = [D2PruneCommand]
