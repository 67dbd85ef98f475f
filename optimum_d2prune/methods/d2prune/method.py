"""D²Prune (Xiong et al., AAAI 2026): dual-Taylor saliency in the OBS sweep, and attention awareness: per block, one of
q/k/v is pruned without weight update (mask only, with the dual-Taylor Wanda score), chosen by reconstruction error
+ ρ·KL(pruned ‖ dense attention) (`attention.py`) or by a global search over candidates (`search.py`)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from ...errors import UnsupportedModelError
from ...pipeline.targets import complete_attentions
from ..base import GroupPlan, ModelRun, PruningMethod
from ..registry import register_method
from ..solvers import DualTaylor, WandaSolver
from ..sparsegpt import obs_solver
from .attention import AttentionInputCapture, AttentionScorer, Projections, plan_attention_updates
from .options import D2PruneOptions

logger = logging.getLogger(__name__)


@register_method
class D2PruneMethod(PruningMethod):
    name = "d2prune"
    options_class = D2PruneOptions
    options: D2PruneOptions

    def setup(self, seq_len: int) -> None:
        o = self.options
        dual = DualTaylor(o.lambda1, o.lambda2, o.scale(seq_len))
        self.solver = obs_solver(o, dual_taylor=dual, measure_flips=o.measure_flips)
        self.unupdated_solver = WandaSolver(dual_taylor=dual)

    def solvers(self) -> list:
        return [self.solver, self.unupdated_solver]

    def with_skip_update(self, skip_update: str) -> "D2PruneMethod":
        """The same method with another `skip_update` (the global search's candidates)."""
        return type(self)(dataclasses.replace(self.options, skip_update=skip_update), self.pattern)

    def check(self, plan, adapter) -> None:
        if not self.options.attention_aware:
            return
        blocks = [block for stack in plan.stacks for block in stack.blocks]
        without = [i for i, block in enumerate(blocks) if not adapter.has_attention(block)]
        if without and len(without) < len(blocks):
            logger.info("Blocks %s have no softmax attention (state-space or linear-attention layers): they are pruned "
                        "with every projection updated.", ", ".join(map(str, without)))
        if len(without) == len(blocks):
            raise UnsupportedModelError(
                "D²Prune's attention-aware choice needs the blocks' q/k/v projections, and none was found (looked "
                "for separate q/k/v linears such as q_proj/k_proj/v_proj or query/key/value, and fused ones such as "
                "qkv_proj, c_attn, query_key_value). Prune with `method_options={'skip_update': 'none'}` (every "
                "projection updated) or a baseline method (sparsegpt, wanda, magnitude: they need only the block "
                "list), choose the layers with `targets`, or register an adapter that sets `qkv_names` "
                "(docs/architectures.md)."
            )

    # ------------------------------------------------------------------ per group
    def _aware(self, work) -> bool:
        """Whether this group's q/k/v choice applies: the method asks for one, the group holds q, k and v of every
        attention it touches, and none of them was left out for non-finite values."""
        if not self.options.attention_aware or work.screened or not any(t.projection for t in work.targets):
            return False
        if not complete_attentions(work.block_targets):
            work.services.once("partial q/k/v",
                               "Some blocks have q/k/v only partly targeted (`targets`/`ignore`): they are pruned "
                               "without the q/k/v choice (every projection updated).")
            return False
        return complete_attentions(work.targets)

    def _scored(self, work) -> bool:
        return self._aware(work) and self.options.skip_update == "dynamic" and self.options.kl_weight > 0

    def observers(self, work) -> list[Any]:
        """The inputs of each attention module of the group, for the KL term (the first `kl_samples` sequences)."""
        if not self._scored(work):
            return []
        attentions = work.services.adapter.attention_groups(work.block)
        captures = {number: AttentionInputCapture(attentions[number][0], self.options.kl_samples)
                    for number in sorted({t.attention for t in work.targets if t.projection})}
        work.observed["attention"] = (attentions, captures)
        return list(captures.values())

    def plan(self, work) -> GroupPlan:
        aware, scored = self._aware(work), self._scored(work)
        attentions, captures = work.observed.pop("attention", ([], {}))
        unupdated: set[tuple[int, str]] = set()  # (attention module, projection) left without update
        outputs = {}
        numbers = sorted({t.attention for t in work.targets if t.projection})
        for number in numbers:
            qkv = {t.projection: t for t in work.targets if t.projection and t.attention == number}
            scorer = AttentionScorer(
                work.services.adapter, attentions[number][0] if scored else None,
                captures[number].inputs if scored and number in captures else [], self.options.kl_weight,
                work.services.reduce_floats(work.stats.device), work.services.runtime.kl_chunk_mib * 2**20,
                self.options.kl_query_rows)
            with work.services.phase("attention choice"):
                projections = Projections(qkv, work.stats.of, {p: work.pattern_of(t) for p, t in qkv.items()})
                plan = plan_attention_updates(self.options.skip_update if aware else "none", work.index, projections,
                                              (self.solver, self.unupdated_solver), scorer)
            unupdated |= {(number, p) for p in plan.unupdated}
            outputs.update(plan.outputs)
            if plan.record is not None:
                if len(numbers) > 1:
                    plan.record.attention = number
                work.services.report.attention.append(plan.record)
        return GroupPlan({t.name: self.unupdated_solver if (t.attention, t.projection) in unupdated else self.solver
                          for t in work.targets}, outputs)

    # ------------------------------------------------------------------ whole run
    def prune_model(self, job: ModelRun):
        from .search import global_search, resolve_strategy

        if self.options.attention_aware and self.options.skip_update == "dynamic" and (
                resolve_strategy(self.options.strategy, job) == "global"):
            return global_search(self, job)
        return job.run(self, job.batches)
