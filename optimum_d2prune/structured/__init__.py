"""Structured pruning: shrink a transformers model to a smaller *dense* one with a standard config.

Removes MLP channels, attention heads (whole key/value groups), MoE experts or whole blocks, the same number in every
block, so that plain `from_pretrained` loads the result and every runtime runs it faster and stores it smaller.

```python
from optimum_d2prune.structured import StructuredConfig, save_shrunk, shrink

report = shrink(model, calib, StructuredConfig(mode="channels", ratio=0.2))   # in place
distill(model, dense_model, calib, RecoveryConfig(steps=50), layer_map=report.kept_blocks)   # optional
save_shrunk(model, "out", report, tokenizer=tokenizer)
```
"""

from .config import COMPENSATIONS, METHODS, MODES, StructuredConfig
from .export import save_shrunk
from .plan import ShrinkPlan, plan_shrink, valid_ratios
from .recovery import RecoveryConfig, RecoveryReport, distill
from .report import ShrinkReport, UnitRecord
from .pipeline import shrink

__all__ = ["COMPENSATIONS", "METHODS", "MODES", "RecoveryConfig", "RecoveryReport", "ShrinkPlan", "ShrinkReport",
           "StructuredConfig", "UnitRecord", "distill", "valid_ratios", "plan_shrink", "save_shrunk", "shrink"]
