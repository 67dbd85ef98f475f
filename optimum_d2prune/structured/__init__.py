"""Structured pruning: shrink a transformers model to a smaller *dense* one with a standard config.

Removes MLP channels, attention heads (whole key/value groups), MoE experts or whole blocks, the same number in every
block, so that plain `from_pretrained` loads the result and every runtime runs it faster and stores it smaller. The
registered method `shrink` runs it through `D2Pruner` and `optimum-cli d2prune --method shrink`; the functions here
are the same steps for a script:

```python
from optimum_d2prune.structured import StructuredConfig, save_shrunk, shrink

report = shrink(model, calib, StructuredConfig(mode="channels", ratio=0.2))   # in place
distill(model, dense_model, calib, RecoveryConfig(steps=50), layer_map=report.kept_blocks)   # optional
save_shrunk(model, "out", report, tokenizer=tokenizer)
```

Imported on first use (the options are read by the command line, which does not import torch).
"""

from __future__ import annotations

from ..extras import lazy_names

_LAZY = {
    "COMPENSATIONS": "config", "METHODS": "config", "MODES": "config", "ShrinkOptions": "config",
    "StructuredConfig": "config", "save_shrunk": "export", "ShrinkPlan": "plan", "plan_shrink": "plan",
    "valid_ratios": "plan", "RecoveryConfig": "recovery", "RecoveryReport": "recovery", "distill": "recovery",
    "ShrinkReport": "report", "UnitRecord": "report", "shrink": "pipeline",
}
__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_names(__name__, _LAZY)
