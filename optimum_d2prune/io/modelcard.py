"""The model card (`README.md`) of a pruned checkpoint, built with huggingface_hub's `ModelCard`/`ModelCardData`.

Every value that comes from outside this library (a base model id or license inherited from another card, data
file names, metric names, the command line, a user-registered method name) is validated or escaped before it
enters the card: the metadata goes through `ModelCardData` (YAML), ids must be Hub repo ids, and text is escaped
for Markdown and HTML, so a value can neither add a heading nor inject HTML nor break a table or a code fence.
"""

from __future__ import annotations

import html
import logging
import re
from typing import Any, Optional

from ..configuration import CONFIG_NAME
from .hub import is_repo_id

logger = logging.getLogger(__name__)

METHOD_NAMES = {"d2prune": "D²Prune", "sparsegpt": "SparseGPT", "wanda": "Wanda", "magnitude": "magnitude pruning"}
#: below this many examples per zero-shot task, the accuracy's standard error is over ~5 points: the card says so
MIN_ZERO_SHOT_EXAMPLES = 100
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]|#~!])")
_LICENSE_RE = re.compile(r"^[A-Za-z0-9][\w.+-]*$")


def md(value: Any) -> str:
    """`value` as inline Markdown text: one line, HTML escaped, Markdown punctuation backslash-escaped."""
    text = " ".join(str(value).split())
    return _MD_SPECIAL.sub(r"\\\1", html.escape(text, quote=False))


def code_block(text: str) -> str:
    """A fenced code block holding `text` verbatim (the fence is longer than any run of back-ticks inside)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


def card_tags(record: dict[str, Any]) -> list[str]:
    """`d2prune`, `pruned`, `sparse`, `sparsity-50` (or `sparsity-2of4` for 2:4) and the method."""
    config = record["config"]
    structure = record.get("mask_structure", config.get("mask_structure", "unstructured"))
    if structure == "unstructured":
        level = f"sparsity-{round(100 * float(config.get('sparsity', 0.5)))}"
    else:
        n, m = structure.split(":")
        level = f"sparsity-{n}of{m}"
    method = str(config.get("method", "d2prune"))
    return ["d2prune", "pruned", "sparse", level] + ([method] if re.fullmatch(r"[\w.-]{1,64}", method) else [])


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return md(value)


def _size_text(size: Any) -> str:
    if not isinstance(size, dict):
        return "-"
    parts = []
    if isinstance(size.get("windows"), int):
        parts.append(f"{size['windows']} windows")
    if isinstance(size.get("tokens"), int):
        parts.append(f"{size['tokens']:,} tokens")
    if isinstance(size.get("examples"), int):
        parts.append(f"{size['examples']} examples")
    return ", ".join(parts) or "-"


def _evaluation_table(evaluation: dict[str, Any], sizes: dict[str, Any]) -> str:
    if not evaluation:
        return ""
    columns: list[str] = []
    for value in evaluation.values():
        if isinstance(value, dict):
            columns += [k for k in value if k not in columns]
    header = ["metric"] + (columns or ["value"]) + (["evaluated on"] if sizes else [])
    lines = ["| " + " | ".join(md(h) for h in header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, value in evaluation.items():
        cells = [_fmt(value.get(c)) for c in columns] if isinstance(value, dict) else [_fmt(value)]
        if sizes:
            cells.append(_size_text(sizes.get(name)))
        lines.append("| " + " | ".join([md(name)] + cells) + " |")
    return "\n".join(lines)


def small_zero_shot(record: dict[str, Any]) -> dict[str, int]:
    """Zero-shot metrics of the record that rest on fewer than `MIN_ZERO_SHOT_EXAMPLES` examples: name -> count."""
    sizes = record.get("evaluation_sizes") or {}
    return {name: size["examples"] for name, size in sizes.items()
            if isinstance(size, dict) and isinstance(size.get("examples"), int)
            and size["examples"] < MIN_ZERO_SHOT_EXAMPLES}


def _provenance(record: dict[str, Any]) -> Optional[str]:
    source = record.get("source") or {}
    if not source.get("gguf_file"):
        return None
    quantization = source.get("gguf_quantization")
    kind = f"a {md(quantization)} GGUF file" if quantization else "a GGUF file"
    return (f"**Weights: dequantized from {kind}** ({md(source['gguf_file'])}) before pruning. The pruned "
            "checkpoint holds those dequantized values: its quality is bounded by the quantized model's, not the "
            "original full-precision model's.")


def make_model_card(record: dict[str, Any], license: Optional[str] = None, extra_files: Optional[list[str]] = None):
    """A `huggingface_hub.ModelCard` describing the checkpoint recorded in `record` (`d2prune_config.json`).

    `license` defaults to the record's; a license or `base_model` that is not a plain identifier is left out.
    """
    from huggingface_hub import ModelCard, ModelCardData

    config = record["config"]
    base_model = record.get("base_model")
    if base_model is not None and not is_repo_id(base_model):
        logger.warning("The record's base_model %r is not a Hub repository id: left out of the card.",
                       str(base_model)[:80])
        base_model = None
    license = license if license is not None else record.get("license")
    if license is not None and not (isinstance(license, str) and _LICENSE_RE.match(license)):
        logger.warning("License %r is not a license identifier: left out of the card.", str(license)[:80])
        license = None
    data = ModelCardData(base_model=base_model, license=license, library_name="transformers",
                         pipeline_tag="text-generation", tags=card_tags(record))
    method_id = str(config.get("method", "d2prune"))
    method = md(METHOD_NAMES.get(method_id, method_id))
    structure = str(record.get("mask_structure", "unstructured"))
    pattern = (f"{float(config.get('sparsity', 0.5)):.0%} unstructured" if structure == "unstructured"
               else f"{md(structure)} semi-structured")
    title = f"{base_model} pruned with {method}" if base_model else f"Model pruned with {method}"
    calibration = record.get("calibration") or {}
    calib = ", ".join(f"{md(k)}={md(v)}" for k, v in calibration.items()) or "not recorded"
    sections = [
        f"# {title}",
        f"{pattern} sparsity ({float(record.get('total_sparsity', 0.0)):.2%} zeros over {len(record['sparsity'])} "
        f"pruned linear layers), produced by `optimum-d2prune` with the **{method}** method "
        "(D²Prune: dual-Taylor saliency with attention-aware weight updates, AAAI 2026).",
        "The weights are stored densely (standard safetensors) with the zeros in place: the model loads in plain "
        "transformers and in any tool that reads safetensors. Speed-ups need a sparse kernel (e.g. 2:4 on "
        "Ampere+ GPUs); the file size is that of the dense model.",
    ]
    provenance = _provenance(record)
    if provenance:
        sections.append(provenance)
    sections += [
        "## Usage\n\n```python\nfrom transformers import AutoModelForCausalLM\n\n"
        "model = AutoModelForCausalLM.from_pretrained(\"<this repo>\")\n\n"
        "# or, checking that every pruned module kept its zeros:\nfrom optimum_d2prune import load_pruned\n\n"
        "model, config = load_pruned(\"<this repo>\")\n```",
        f"## Calibration\n\n{calib}",
    ]
    sizes = record.get("evaluation_sizes") or {}
    table = _evaluation_table(record.get("evaluation") or {}, sizes)
    if table:
        evaluation = f"## Evaluation\n\n{table}"
        small = small_zero_shot(record)
        if small:
            logger.warning("Zero-shot results on fewer than %d examples per task (%s): the card flags them as rough.",
                           MIN_ZERO_SHOT_EXAMPLES, ", ".join(f"{k}: {v}" for k, v in small.items()))
            evaluation += (f"\n\n**Warning:** {', '.join(md(k) for k in small)} rest on fewer than "
                           f"{MIN_ZERO_SHOT_EXAMPLES} examples per task ({min(small.values())} at least): the "
                           "standard error of such an accuracy is around 5 points or more. Treat these numbers as a "
                           "rough check, not a benchmark.")
        sections.append(evaluation)
    if record.get("attention"):
        counts = {p: sum(isinstance(a, dict) and a.get("chosen") == p for a in record["attention"]) for p in "qkv"}
        sections.append(
            "## Attention-aware updates\n\nProjection left without weight update, per block: "
            + ", ".join(f"{p}: {n} blocks" for p, n in counts.items())
            + f" (per block in `{CONFIG_NAME}`)."
        )
    reproduce = record.get("command") or "\n".join(f"{k} = {v!r}" for k, v in sorted(config.items()))
    sections.append(f"## How it was made\n\n{code_block(str(reproduce))}")
    versions = ", ".join(f"{md(k)} {md(v)}" for k, v in (record.get("versions") or {}).items())
    sections.append(f"Library versions: {versions}. Full record (per-module sparsity, config): `{CONFIG_NAME}`.")
    if extra_files:
        sections.append("Also in this repository: " + ", ".join(md(f) for f in extra_files) + ".")
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    return ModelCard(content)
