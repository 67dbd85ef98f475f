"""`D2Pruner`: the user-facing entry point. It checks everything first, then hands the model to the method, which
runs the pipeline (`pipeline.engine`) once or, for a whole-run decision such as D²Prune's global search, several
times."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any, Optional, Union

from torch import nn

from .architectures import ArchitectureAdapter, get_adapter
from .calibration.batches import Batch, prepare_batches
from .configuration import D2PruneConfig
from .errors import ConfigError, ModelStateError
from .methods.base import ModelRun
from .pipeline.checks import check_before_pruning
from .pipeline.distributed import distributed_session
from .pipeline.engine import PruningEngine
from .pipeline.targets import is_partly_pruned
from .report import PruneReport

logger = logging.getLogger(__name__)


class D2Pruner:
    """Prunes a transformers (or timm) model in place with D²Prune or a baseline, block by block.

    After `prune`, `pruner.report` holds a `PruneReport` (per-layer sparsity, reconstruction error and solver,
    the per-block attention choice with its error and KL, time and peak memory); `print(pruner.report)` shows it.

    Example:
    ```python
    >>> from optimum_d2prune import D2PruneConfig, D2Pruner
    >>> from optimum_d2prune.calibration import get_calibration_dataset
    >>> calib = get_calibration_dataset("c4", tokenizer, num_samples=128, seq_len=2048)
    >>> pruner = D2Pruner(D2PruneConfig(sparsity=0.5))
    >>> model = pruner.prune(model, calib)
    >>> print(pruner.report)
    ```
    """

    def __init__(self, config: Optional[D2PruneConfig] = None, **kwargs: Any) -> None:
        if config is not None and kwargs:
            raise ConfigError("Pass either a D2PruneConfig or keyword arguments, not both.")
        self.config = config if config is not None else D2PruneConfig(**kwargs)
        if not isinstance(self.config, D2PruneConfig):
            raise ConfigError(f"`config` must be a D2PruneConfig, got {type(self.config).__name__}.")
        self.report: Optional[PruneReport] = None

    def prune(
        self, model: nn.Module, calib_loader: Iterable[Batch], adapter: Optional[ArchitectureAdapter] = None
    ) -> nn.Module:
        """Prune `model` in place on the calibration batches and return it.

        Args:
            model: a transformers model whose blocks can be found (causal LMs, encoder-decoders, vision and audio
                encoders; see docs/architectures.md), or a timm VisionTransformer.
            calib_loader: an iterable of batches: a LongTensor `[B, T]` (or `[T]`) of input ids, a dict with
                `input_ids` and optional `attention_mask` (and `decoder_input_ids` for an encoder-decoder), a float
                tensor `[B, 3, H, W]` or a dict with `pixel_values`, audio `input_features` or raw audio
                `input_values`. A `torch.utils.data.DataLoader` works as is.
            adapter: the architecture adapter to use (default: `get_adapter(model)`).
        """
        if is_partly_pruned(model):
            raise ModelStateError(
                "This model is partly pruned: an earlier `prune` call on it was interrupted after it had started "
                "changing weights. Reload the model and prune again (with `runtime.checkpoint_dir`, the rerun "
                "resumes from the blocks saved on disk).")
        if adapter is None:
            adapter = get_adapter(model)
        else:
            adapter.validate(model)
        batches = prepare_batches(calib_loader, model)
        engine = PruningEngine(self.config, adapter)
        plan = engine.plan(model)
        method = engine.make_method()
        method.check(plan, adapter)
        plan = check_before_pruning(model, batches, self.config, plan, adapter)  # before any weight is touched
        with distributed_session():
            job = ModelRun(model, plan, adapter, batches,
                           lambda m, b, checkpoint=True: engine.run(model, b, plan, m, checkpoint))
            self.report = method.prune_model(job)
        logger.info("%s", self.report.summary())
        return model

    def save(self, model: nn.Module, save_dir: Union[str, os.PathLike], tokenizer: Any = None, **kwargs: Any):
        """Save the pruned `model` as a standard checkpoint plus `d2prune_config.json` and a model card (see
        `optimum_d2prune.io.save_pruned` for the keyword arguments: `overwrite`, `calibration`, `evaluation`...).
        Refused before `prune()` has run: there is no pruning to record."""
        from .io.save_load import save_pruned
        from .structured.report import ShrinkReport

        if isinstance(self.report, ShrinkReport):  # a smaller dense model, recorded as such
            from .structured.export import save_shrunk

            return save_shrunk(model, save_dir, self.report, tokenizer, **kwargs)
        if self.report is None:
            raise ModelStateError("`D2Pruner.save` needs a pruned model: call `prune(model, calibration)` first (or "
                                  "use `optimum_d2prune.save_pruned(model, save_dir, config)` for a model pruned "
                                  "elsewhere).")

        return save_pruned(model, save_dir, self.config, self.report, tokenizer, **kwargs)
