"""Saving a shrunk model: a standard checkpoint, the shrink record and a model card that says what was removed.

GGUF: neither transformers (it reads GGUF files, dequantizing them, but writes none) nor the `gguf` package (a
low-level reader/writer, no Hugging Face converter) converts a checkpoint offline; llama.cpp's `convert_hf_to_gguf.py`
does, and the card gives the command (`GGUF_STEPS`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

from ..pipeline.finite import nonfinite_parameters
from .report import ShrinkReport

logger = logging.getLogger(__name__)

RECORD_NAME = "structured_shrink.json"
CARD_NAME = "README.md"

GGUF_STEPS = """```bash
# llama.cpp (https://github.com/ggml-org/llama.cpp): convert, then quantize
python llama.cpp/convert_hf_to_gguf.py <this folder> --outfile model-f16.gguf --outtype f16
llama.cpp/build/bin/llama-quantize model-f16.gguf model-q4_k_m.gguf Q4_K_M
```

K-quants (Q4_K_M, ...) need row lengths that are multiples of 256 and Q4_0/Q8_0 multiples of 32; llama-quantize
falls back to another type for tensors that are not (shrink with `channel_multiple` to keep the MLP width aligned)."""


def make_card(report: ShrinkReport, base_model: Optional[str] = None, evaluation: Optional[dict[str, Any]] = None,
              pipeline_tag: Optional[str] = "text-generation") -> Any:
    """A `huggingface_hub.ModelCard` stating what the shrink removed."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(base_model=base_model, library_name="transformers", pipeline_tag=pipeline_tag,
                         tags=["d2prune", "pruned", "structured-pruning", f"structured-{report.mode}"])
    title = f"{base_model} shrunk" if base_model else "Shrunk model"
    sections = [
        f"# {title}: {report.achieved_ratio:.1%} of the block parameters removed ({report.mode})",
        report.describe(),
        "This is a smaller *dense* model with a standard config, produced by `optimum-d2prune`'s structured pruning: "
        "plain `from_pretrained` loads it, and every runtime runs it with fewer parameters (no sparse kernel needed).",
        "## Usage\n\n```python\nfrom transformers import AutoModelForCausalLM\n\n"
        "model = AutoModelForCausalLM.from_pretrained(\"<this folder or repo>\")\n```",
        "## What was removed\n\n" + _removed_table(report),
        f"## GGUF (llama.cpp)\n\n{GGUF_STEPS}",
    ]
    if evaluation:
        rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in evaluation.items())
        sections.append(f"## Evaluation\n\n| metric | value |\n|---|---:|\n{rows}")
    settings = "\n".join(f"{k} = {v!r}" for k, v in sorted(report.config.items()))
    sections.append(f"## How it was made\n\n```\n{settings}\n```\n\nFull record: `{RECORD_NAME}`.")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _removed_table(report: ShrinkReport) -> str:
    if report.removed_blocks:
        scores = ", ".join(f"{s:.4f}" for s in report.block_scores)
        return (f"Blocks {report.removed_blocks} of {len(report.kept_blocks) + len(report.removed_blocks)} (original "
                f"indices), by `{report.saliency}`; scores per block (or start): {scores}.")
    lines = ["| block | kind | units before | removed | consumer error masked | after compensation |",
             "|---:|---|---:|---|---:|---:|"]
    for u in report.units:
        removed = ", ".join(map(str, u.removed)) if len(u.removed) <= 12 else f"{len(u.removed)} units"
        lines.append(f"| {u.block} | {u.kind} | {u.units} | {removed} | {_opt(u.error_masked)} | {_opt(u.error)} |")
    return "\n".join(lines)


def _opt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


def save_shrunk(model: nn.Module, save_dir: Union[str, os.PathLike], report: ShrinkReport, tokenizer: Any = None, *,
                overwrite: bool = False, base_model: Optional[str] = None,
                evaluation: Optional[dict[str, Any]] = None) -> Path:
    """Write the shrunk model (`save_pretrained`, safetensors), the tokenizer, `structured_shrink.json` and a model
    card into `save_dir`, atomically. An existing non-empty folder is refused unless `overwrite=True`."""
    from ..io.atomic import atomic_directory, check_output_dir
    from ..io.record import library_versions

    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"`model` must be a transformers model with `save_pretrained`, got {type(model).__name__}.")
    nonfinite = nonfinite_parameters(model)
    if nonfinite:
        raise ValueError(f"The model holds NaN or Inf in {len(nonfinite)} tensor(s) (e.g. `{nonfinite[0]}`): it is "
                         "not saved.")
    save_dir = check_output_dir(save_dir, overwrite)  # never a folder this tool did not write
    record = {"report": report.to_dict(), "base_model": base_model, "evaluation": evaluation or {},
              "versions": library_versions()}
    pipeline = "image-classification" if getattr(model, "main_input_name", "") == "pixel_values" else "text-generation"
    with atomic_directory(save_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n",
                                       encoding="utf-8")
        make_card(report, base_model, evaluation, pipeline).save(tmp / CARD_NAME)
    logger.info("Saved the shrunk model to %s.", save_dir)
    return save_dir


def record_shrunk_evaluation(save_dir: Union[str, os.PathLike], evaluation: dict[str, Any]) -> None:
    """Add evaluation results to a folder written by `save_shrunk` (its record and card), each file replaced
    atomically: an interruption leaves the earlier version of a file, never a torn one."""
    import uuid

    from huggingface_hub import ModelCard

    save_dir = Path(save_dir)
    record = json.loads((save_dir / RECORD_NAME).read_text(encoding="utf-8"))
    record["evaluation"] = evaluation
    pipeline = ModelCard.load(save_dir / CARD_NAME).data.pipeline_tag
    card = make_card(ShrinkReport.from_dict(record["report"]), record.get("base_model"), evaluation, pipeline)
    files = {RECORD_NAME: json.dumps(record, indent=2, sort_keys=True, default=str) + "\n", CARD_NAME: str(card)}
    for name, content in files.items():
        tmp = save_dir / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, save_dir / name)
