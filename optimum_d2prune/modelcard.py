"""The model card (`README.md`) of a pruned checkpoint, built with huggingface_hub's `ModelCard`/`ModelCardData`."""

from __future__ import annotations

from typing import Any, Optional

from .configuration import CONFIG_NAME

METHOD_NAMES = {"d2prune": "D²Prune", "sparsegpt": "SparseGPT", "wanda": "Wanda", "magnitude": "magnitude pruning"}


def card_tags(record: dict[str, Any]) -> list[str]:
    """`d2prune`, `pruned`, `sparse`, `sparsity-50` (or `sparsity-2of4` for 2:4) and the method."""
    config = record["config"]
    structure = record.get("mask_structure", config.get("mask_structure", "unstructured"))
    if structure == "unstructured":
        level = f"sparsity-{round(100 * float(config['sparsity']))}"
    else:
        n, m = structure.split(":")
        level = f"sparsity-{n}of{m}"
    return ["d2prune", "pruned", "sparse", level, config["method"]]


def _evaluation_table(evaluation: dict[str, Any]) -> str:
    if not evaluation:
        return ""
    columns: list[str] = []
    for value in evaluation.values():
        if isinstance(value, dict):
            columns += [k for k in value if k not in columns]
    header = ["metric"] + (columns or ["value"])
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, value in evaluation.items():
        cells = [value.get(c) for c in columns] if isinstance(value, dict) else [value]
        lines.append("| " + " | ".join([name] + [_fmt(c) for c in cells]) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def make_model_card(record: dict[str, Any], license: Optional[str] = None, extra_files: Optional[list[str]] = None):
    """A `huggingface_hub.ModelCard` describing the checkpoint recorded in `record` (`d2prune_config.json`)."""
    from huggingface_hub import ModelCard, ModelCardData

    config = record["config"]
    base_model = record.get("base_model")
    calibration = record.get("calibration") or {}
    data = ModelCardData(
        base_model=base_model,
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=card_tags(record),
    )
    method = METHOD_NAMES.get(config["method"], config["method"])
    structure = record.get("mask_structure", "unstructured")
    pattern = f"{config['sparsity']:.0%} unstructured" if structure == "unstructured" else f"{structure} semi-structured"
    title = f"{base_model} pruned with {method}" if base_model else f"Model pruned with {method}"
    calib = ", ".join(f"{k}={v}" for k, v in calibration.items()) or "not recorded"
    sections = [
        f"# {title}",
        f"{pattern} sparsity ({record['total_sparsity']:.2%} zeros over {len(record['sparsity'])} pruned linear "
        f"layers), produced by `optimum-d2prune` with the **{method}** method "
        "(D²Prune: dual-Taylor saliency with attention-aware weight updates, AAAI 2026).",
        "The weights are stored densely (standard safetensors) with the zeros in place: the model loads in plain "
        "transformers and in any tool that reads safetensors. Speed-ups need a sparse kernel (e.g. 2:4 on "
        "Ampere+ GPUs); the file size is that of the dense model.",
        "## Usage\n\n```python\nfrom transformers import AutoModelForCausalLM\n\n"
        "model = AutoModelForCausalLM.from_pretrained(\"<this repo>\")\n\n"
        "# or, checking that every pruned module kept its zeros:\nfrom optimum_d2prune import load_pruned\n\n"
        "model, config = load_pruned(\"<this repo>\")\n```",
        f"## Calibration\n\n{calib}",
    ]
    table = _evaluation_table(record.get("evaluation") or {})
    if table:
        sections.append(f"## Evaluation\n\n{table}")
    if record.get("attention"):
        counts = {p: sum(a["chosen"] == p for a in record["attention"]) for p in ("q", "k", "v")}
        sections.append(
            "## Attention-aware updates\n\nProjection left without weight update, per block: "
            + ", ".join(f"{p}: {n} blocks" for p, n in counts.items())
            + f" (per block in `{CONFIG_NAME}`)."
        )
    reproduce = record.get("command") or "\n".join(f"{k} = {v!r}" for k, v in sorted(config.items()))
    sections.append(f"## How it was made\n\n```\n{reproduce}\n```")
    versions = ", ".join(f"{k} {v}" for k, v in (record.get("versions") or {}).items())
    sections.append(f"Library versions: {versions}. Full record (per-module sparsity, config): `{CONFIG_NAME}`.")
    if extra_files:
        sections.append("Also in this repository: " + ", ".join(f"`{f}`" for f in extra_files) + ".")
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    return ModelCard(content)
