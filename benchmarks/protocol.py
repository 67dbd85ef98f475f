"""The BENCH.md protocol for the benchmark scripts: load the model once, prune from the dense state, score, and keep
every finished row in a JSON file so that an interrupted sweep resumes where it stopped.

Two splits (../shared/docs/BENCH.md):

- "bench" (v1): calibrate on every document of `c4_train_sample.jsonl`, PPL on the first 32 x 512 tokens of
  WikiText-2 test. The headline table; never tuned on.
- "dev" (v1.1): calibrate on documents 0-699 (same SparseGPT sampling), PPL on documents 700-799 joined by blank
  lines, tokenized once, first 32 non-overlapping 512-token windows. Every tuning decision uses this split.

    from protocol import Protocol, ProtocolSettings, RowStore, RunCache
    settings = ProtocolSettings()
    bench = Protocol(settings, store=RowStore("rows.json", settings), cache=RunCache.shared(settings))
    row = bench.run("default", {}, "0.5", seed=0, split="dev")   # or the stored row when already done

The shared run cache (`results/runs.json`) holds every finished run by its full resolved config and split, so the
benchmark scripts (tune, ablation, high_sparsity) never prune the same configuration twice: a SparseGPT row of the
ablation is the SparseGPT row of the high-sparsity table, the tuning sweep's default is the ablation's. A changed
library default changes the resolved config, so a stale run is never reused. Runs and rows are compared by their
canonical config (`canonical`), never by the override dicts or names they were stored with: records in the flat
format of earlier releases are converted on reading.

Scripts name configs in today's grouped form (`{"method": "d2prune", "method_options": {"skip_update": "v"}}`);
`parse_overrides` reads `--set`/`--extra` pairs into it. `write_section` rewrites one benchmark's section of the
users' results page (docs/results.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from optimum_d2prune import D2PruneConfig, D2Pruner
from optimum_d2prune.configuration import LEGACY_FIELDS, RuntimeOptions, method_options_class
from optimum_d2prune.calibration import get_calibration_dataset
from optimum_d2prune.evaluation import perplexity

logger = logging.getLogger("protocol")

# the benchmark data (BENCH.md): $D2PRUNE_DATA_DIR, else ../shared/data next to the repository
SHARED = Path(os.environ.get("D2PRUNE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
SPLITS = ("bench", "dev")
RESULTS = Path(__file__).resolve().parent / "results"
#: the users' results page: each benchmark script that owns a section rewrites it there (`write_section`)
RESULTS_DOC = Path(__file__).resolve().parents[1] / "docs" / "results.md"
#: BENCH.md v1.1: the dev split of c4_train_sample.jsonl
DEV_CALIBRATION_DOCS = range(0, 700)
DEV_EVAL_DOCS = range(700, 800)
#: flat config fields whose default (or a preset's value) changed after runs without them were cached, and the value
#: those runs had; any other field missing from a stored config takes today's default
PREDATING_VALUES = {"admm_steps": 0}
#: library changes that altered the results of some configs without changing the configs: (revision, what changed,
#: which canonical configs it changed). A run stored before a revision that applies to its config (a run without a
#: "revision" is revision 0) is not the run today's library makes: the cache misses it and a rows file refuses it.
REVISIONS = (
    (1, "ADMM of the block-refit projections on the block objective instead of their layer's",
     lambda config: bool(config["method_options"].get("admm_steps")) and bool(config["reconstruction"])),
)


def revision(config: dict) -> int:
    """The latest revision of `REVISIONS` that applies to the resolved `config` (0: none)."""
    return max((number for number, _, applies in REVISIONS if applies(config)), default=0)


def revision_field(config: dict) -> dict:
    """What a run or row stores of its library revision: nothing for revision 0 (as those stored before)."""
    number = revision(config)
    return {"revision": number} if number else {}


def make_config(overrides: dict[str, Any], level: str) -> D2PruneConfig:
    """The config of a row: its level and its overrides in today's grouped form (`{"method": "sparsegpt",
    "method_options": {"refit_steps": 8}}`); a stored flat record of an earlier release is read by
    `D2PruneConfig.from_dict` too."""
    return D2PruneConfig.from_dict({**level_kwargs(level), **overrides})


def canonical(config: Union[dict, D2PruneConfig], seed: Optional[int] = None) -> dict:
    """What decides a run's result, in today's format: the resolved config (a flat dict stored by an earlier release
    is converted), the allocation actually applied (OWL below its `min_sparsity` is the uniform one), and the
    calibration seed."""
    if isinstance(config, dict):
        config = dict(config)
        stored_seed = config.pop("seed", 0)
        seed = stored_seed if seed is None else seed
        config = D2PruneConfig.from_dict(stored_config(config))
    data = config.to_dict()
    data.pop("meta")
    if data["allocation"] != "uniform" and not config.allocation_options.applies(config.pattern):
        data["allocation"], data["allocation_options"] = "uniform", {}
    data["allocation_options"].pop("min_sparsity", None)
    data["seed"] = seed or 0
    return data


def parse_value(text: str):
    """`--set KEY=VALUE` value: int, float, true/false/none, else the string ("none" stays text for an option
    whose choices are text, like `skip_update=none`: `parse_overrides`)."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


#: the option groups of a config, as `--set GROUP.NAME=VALUE` names them
GROUPS = ("method_options", "allocation_options", "reconstruction_options", "runtime")
#: `configuration.LEGACY_FIELDS`' group names -> the config's
_LEGACY_GROUPS = {"method": "method_options", "allocation": "allocation_options",
                  "reconstruction": "reconstruction_options", "runtime": "runtime"}


def option_names(method: str) -> dict[str, tuple[str, ...]]:
    """The names `--set` accepts for a row of `method`: the config's own fields (key "") and each group's options."""
    from optimum_d2prune.refine.options import ALLOCATION_OPTIONS, ReconstructionOptions

    def names(*classes) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f.name for cls in classes for f in fields(cls)))

    return {"": tuple(f.name for f in fields(D2PruneConfig) if f.name not in GROUPS),
            "method_options": names(method_options_class(method)),
            "allocation_options": names(*ALLOCATION_OPTIONS.values()),
            "reconstruction_options": names(ReconstructionOptions), "runtime": names(RuntimeOptions)}


def _takes_text(method: str, group: str, name: str) -> bool:
    """Whether the option's default is text (then "none" is one of its choices, not None)."""
    from optimum_d2prune.refine.options import ALLOCATION_OPTIONS, ReconstructionOptions

    classes = {"": (D2PruneConfig,), "method_options": (method_options_class(method),),
               "allocation_options": tuple(ALLOCATION_OPTIONS.values()),
               "reconstruction_options": (ReconstructionOptions,), "runtime": (RuntimeOptions,)}[group]
    return any(isinstance(f.default, str) for cls in classes for f in fields(cls) if f.name == name)


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings as config overrides in today's grouped form. `GROUP.NAME=VALUE` names the group
    (`method_options.kl_weight=3`); a bare name is a field of the config (`preset=max_quality`) or an option of
    exactly one group (`kl_weight=3` -> `{"method_options": {"kl_weight": 3}}`). `refit_steps`, `refit_tolerance`
    and `damp_percent` are options of the method and of the reconstruction: name the group. Method options are
    those of the `method=` among the pairs (default d2prune). Raises ValueError naming today's name for a name of
    an earlier release (`attention_update` -> `method_options.skip_update`)."""
    flat: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected KEY=VALUE, got {pair!r}.")
        flat[key.strip()] = parse_value(value)
    method = flat.get("method", "d2prune")
    names = option_names(method)
    out: dict[str, Any] = {}
    for key, value in flat.items():
        group, name = _owner(key, names)
        if value is None and _takes_text(method, group, name):
            value = "none"
        if group:
            out.setdefault(group, {})[name] = value
        else:
            out[name] = value
    return out


def _owner(key: str, names: dict[str, tuple[str, ...]]) -> tuple[str, str]:
    """(group, option) of an override key ("" for a field of the config itself)."""
    if "." in key:
        group, name = key.split(".", 1)
        if group not in GROUPS or name not in names[group]:
            known = names.get(group)
            raise ValueError(f"unknown override {key!r}: " + (f"{group} has {list(known)}." if known is not None
                                                              else f"the groups are {list(GROUPS)}."))
        return group, name
    if key in names[""]:
        return "", key
    owners = [group for group in GROUPS if key in names[group]]
    if len(owners) == 1:
        return owners[0], key
    if owners:
        raise ValueError(f"{key!r} is an option of {' and '.join(owners)}: write "
                         + " or ".join(f"{group}.{key}" for group in owners) + ".")
    group, name = LEGACY_FIELDS.get(key, ("", key))
    if group == "drop":
        raise ValueError(f"{key!r} is not part of a config: the scripts take the calibration seed as --seed(s).")
    if name != key:  # renamed since
        today = name if group == "top" else f"{_LEGACY_GROUPS[group]}.{name}"
        values = " (its value names what is not updated: \"all\" is \"none\", \"none\" is \"qkv\")" \
            if name == "skip_update" else ""
        raise ValueError(f"{key!r} is the name of an earlier release: write {today!r}{values}.")
    raise ValueError(f"unknown override {key!r}: the config's fields are {list(names[''])}, and the options of "
                     + ", ".join(f"{group} {list(names[group])}" for group in GROUPS) + ".")


def merge_overrides(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, option groups merged name by name."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if key in GROUPS and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = copy.deepcopy(value)
    return out


def describe_overrides(overrides: dict[str, Any]) -> str:
    """`{"method": "d2prune", "method_options": {"skip_update": "v"}}` ->
    `method=d2prune, method_options.skip_update=v` (the form `--set` takes)."""
    items = []
    for key, value in overrides.items():
        if key in GROUPS and isinstance(value, dict):
            items += [f"{key}.{name}={option}" for name, option in value.items()]
        else:
            items.append(f"{key}={value}")
    return ", ".join(items)


def level_kwargs(level: str) -> dict:
    """D2PruneConfig fields of a level: "0.5" -> sparsity, "2:4" -> mask_structure."""
    return {"mask_structure": level} if ":" in level else {"sparsity": float(level)}


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, calibration and evaluation arguments of the BENCH.md protocol (shared by the LLM benchmarks)."""
    parser.add_argument("--model", default="smollm2", help="Hub id, local folder, .gguf file, or 'smollm2'.")
    parser.add_argument("--gguf-file", default=None)
    parser.add_argument("--calibration", default=str(SHARED / "c4_train_sample.jsonl"),
                        help='A local .jsonl/.txt file, "c4", "wikitext2", or "self" (text sampled from the model).')
    parser.add_argument("--eval", default=str(SHARED / "wikitext2_test.txt"))
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--no-shared-runs", action="store_true",
                        help="Neither read nor write the shared run cache (results/runs.json).")


def protocol_from_args(args: argparse.Namespace, rows: Optional[Union[str, os.PathLike]]) -> "Protocol":
    """The protocol of `add_protocol_arguments`' arguments, its rows in `rows`, with the shared run cache."""
    settings = ProtocolSettings.from_args(args)
    cache = RunCache(None, settings) if args.no_shared_runs else RunCache.shared(settings)
    return Protocol(settings, RowStore(rows, settings), cache)


@dataclass(frozen=True)
class ProtocolSettings:
    """What a row's numbers depend on besides its config, level, seed and split (stored with the rows)."""

    model: str = "smollm2"
    gguf_file: Optional[str] = None
    c4: str = str(SHARED / "c4_train_sample.jsonl")
    wikitext: str = str(SHARED / "wikitext2_test.txt")
    num_samples: int = 32
    seq_len: int = 512
    eval_windows: int = 32

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ProtocolSettings":
        """From the arguments of `add_protocol_arguments` (`--calibration` is the C4 file of both splits)."""
        return cls(model=args.model, gguf_file=args.gguf_file, c4=args.calibration, wikitext=args.eval,
                   num_samples=args.num_samples, seq_len=args.seq_len, eval_windows=args.eval_windows)

    def describe(self) -> str:
        return (f"{self.num_samples} x {self.seq_len} calibration tokens of {Path(self.c4).name}; "
                f"PPL on the first {self.eval_windows} x {self.seq_len}-token windows")

    def matches(self, stored: Optional[dict]) -> bool:
        """Whether a results file's recorded settings are these: every setting equal, the data files by name (the
        folder holding the benchmark data differs between machines; `$D2PRUNE_DATA_DIR`)."""
        if not isinstance(stored, dict) or set(stored) != set(asdict(self)):
            return False
        return _by_file_name(stored) == _by_file_name(asdict(self))


def _by_file_name(settings: dict) -> dict:
    return {k: Path(v).name if k in ("c4", "wikitext") and v else v for k, v in settings.items()}


def row_key(name: str, level: str, seed: int, split: str) -> str:
    return f"{name}|{level}|{seed}|{split}"


class RowStore:
    """Finished rows in a JSON file, keyed by (config name, level, seed, split); written after every row.

    The file also records the `ProtocolSettings`: rows of another protocol (a smoke run with fewer windows) are
    refused instead of silently mixed. A row is what its stored config ran (`Protocol.finished` compares canonical
    configs), so a row stored under an earlier name of the same config is found by that config (`find_config`).
    """

    def __init__(self, path: Optional[Union[str, os.PathLike]], settings: ProtocolSettings):
        self.path = Path(path) if path is not None else None
        self.settings = settings
        self.rows: dict[str, dict] = {}
        self._aliases: dict[str, dict] = {}  # today's name of a row stored under another one (never written)
        self._canonical: dict[int, dict] = {}
        if self.path is not None and self.path.is_file():
            data = json.loads(self.path.read_text())
            if not settings.matches(data.get("protocol")):
                raise ValueError(f"{self.path} holds rows of another protocol ({data.get('protocol')}); this run uses "
                                 f"{asdict(settings)}. Pass another rows file or delete that one.")
            self.rows = {row_key(r["name"], r["level"], r["seed"], r["split"]): r for r in data["rows"]}

    def get(self, name: str, level: str, seed: int, split: str) -> Optional[dict]:
        key = row_key(name, level, seed, split)
        return self.rows.get(key, self._aliases.get(key))

    def find_config(self, config: dict, level: str, seed: int, split: str) -> Optional[dict]:
        """A row of this level, seed and split, under any name, whose stored config is `config` (canonical)."""
        for row in self.rows.values():
            if (row["level"], row["seed"], row["split"]) != (level, seed, split) or "config" not in row:
                continue
            if id(row) not in self._canonical:
                self._canonical[id(row)] = canonical(row["config"], seed)
            if self._canonical[id(row)] == config:
                return row
        return None

    def alias(self, name: str, row: dict) -> None:
        """Find `row` under `name` too (in memory: the file keeps the name it was stored under)."""
        self._aliases[row_key(name, row["level"], row["seed"], row["split"])] = row

    def add(self, row: dict) -> None:
        self.rows[row_key(row["name"], row["level"], row["seed"], row["split"])] = row
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"protocol": asdict(self.settings), "rows": list(self.rows.values())}, indent=1)
                       + "\n")
        tmp.replace(self.path)


class RunCache:
    """Finished runs of every benchmark script, keyed by the run's resolved config (level and seed included) and
    split; the measured fields only (a script's row adds its own name). Refuses a file of another protocol."""

    FIELDS = ("ppl", "ratio", "seconds", "unupdated", "block_sparsity")

    def __init__(self, path: Optional[Union[str, os.PathLike]], settings: ProtocolSettings):
        self.path = Path(path) if path is not None else None
        self.settings = settings
        self.runs: dict[str, dict] = {}
        if self.path is not None and self.path.is_file():
            data = json.loads(self.path.read_text())
            if not settings.matches(data.get("protocol")):
                raise ValueError(f"{self.path} holds runs of another protocol ({data.get('protocol')}); this run "
                                 f"uses {asdict(settings)}. Pass --no-shared-runs or another protocol's file.")
            self.runs = {self.key(r["config"], r["split"], r["threads"], r.get("revision", 0)): r
                         for r in data["runs"]}

    @classmethod
    def shared(cls, settings: ProtocolSettings) -> "RunCache":
        """The repository's cache (`benchmarks/results/runs.json`) for the BENCH.md protocol, a throwaway one for
        any other protocol (a smoke run with fewer windows must not write next to the real runs)."""
        return cls(RESULTS / "runs.json" if settings.matches(asdict(ProtocolSettings())) else None, settings)

    @staticmethod
    def key(config: dict, split: str, threads: int, stored_revision: Optional[int] = None) -> str:
        """The run's canonical config (`canonical`: a row that names a default and one that leaves it to the library
        are the same run). The torch thread count is part of a run's identity: the summation order changes with it,
        and 30 blocks of pruning turn that into percents of PPL at high sparsity. `stored_revision`: a stored run's
        library revision; None for a run of today's library (`revision`)."""
        resolved = canonical(config)
        number = revision(resolved) if stored_revision is None else stored_revision
        return RunCache._key(resolved, split, threads, number)

    @staticmethod
    def _key(resolved: dict, split: str, threads: int, number: int) -> str:
        return json.dumps({"config": resolved, "split": split, "threads": threads, "revision": number},
                          sort_keys=True)

    def get(self, config: dict, split: str, threads: Optional[int] = None) -> Optional[dict]:
        return self.runs.get(self.key(config, split, threads or torch.get_num_threads()))

    def add(self, config: dict, split: str, row: dict, threads: Optional[int] = None) -> None:
        threads = threads or torch.get_num_threads()
        resolved = canonical(config)
        self.runs[self._key(resolved, split, threads, revision(resolved))] = {
            "config": config, "split": split, "threads": threads, **revision_field(resolved),
            **{k: row[k] for k in self.FIELDS if k in row}}
        if self.path is None:
            return
        # another script may have added runs since this one read the file: merge before writing
        if self.path.is_file():
            theirs = json.loads(self.path.read_text()).get("runs", [])
            self.runs = {**{self.key(r["config"], r["split"], r["threads"], r.get("revision", 0)): r for r in theirs},
                         **self.runs}
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"protocol": asdict(self.settings), "runs": list(self.runs.values())}, indent=1)
                       + "\n")
        tmp.replace(self.path)


class Protocol:
    """One loaded model, its dense weights, the calibration samples of each (split, seed), the row store, and the
    run cache shared between scripts."""

    def __init__(self, settings: ProtocolSettings, store: Optional[RowStore] = None,
                 cache: Optional[RunCache] = None):
        self.settings = settings
        self.store = store if store is not None else RowStore(None, settings)
        self.cache = cache if cache is not None else RunCache(None, settings)
        self._model = None
        self._calibration: dict[tuple[str, int], list] = {}

    def _load(self):
        if self._model is None:
            from optimum_d2prune.models import load_causal_lm

            self._model, self.tokenizer = load_causal_lm(self.settings.model, gguf_file=self.settings.gguf_file)
            self._dense = copy.deepcopy(self._model.state_dict())
        return self._model

    def dense_model(self):
        """The model with its dense weights (put back after an earlier run pruned them)."""
        model = self._load()
        model.load_state_dict(self._dense)
        return model

    def calibration(self, split: str, seed: int) -> list:
        _check_split(split)
        key = (split, seed)
        if key not in self._calibration:
            self._load()
            documents = DEV_CALIBRATION_DOCS if split == "dev" else None
            self._calibration[key] = get_calibration_dataset(self.settings.c4, self.tokenizer,
                                                             self.settings.num_samples, self.settings.seq_len,
                                                             seed=seed, documents=documents)
        return self._calibration[key]

    def score(self, split: str) -> float:
        """PPL of the model as it is now: WikiText-2 ("bench") or the held-out dev documents ("dev")."""
        _check_split(split)
        model = self._load()
        s = self.settings
        if split == "dev":
            return perplexity(model, self.tokenizer, s.c4, seq_len=s.seq_len, max_windows=s.eval_windows,
                              documents=DEV_EVAL_DOCS, desc="dev PPL")
        return perplexity(model, self.tokenizer, s.wikitext, seq_len=s.seq_len, max_windows=s.eval_windows,
                          desc="WikiText-2 PPL")

    def dense(self, split: str) -> float:
        """Dense PPL of a split (stored as the row ("dense", "-", 0, split))."""
        row = self.store.get("dense", "-", 0, split)
        if row is None:
            self.dense_model()
            row = {"name": "dense", "level": "-", "seed": 0, "split": split, "overrides": {},
                   "ppl": self.score(split), "seconds": 0.0}
            self.store.add(row)
        return row["ppl"]

    def finished(self, name: str, overrides: dict[str, Any], level: str, seed: int, split: str) -> Optional[dict]:
        """The row of this run if it is done: stored under this name, or made by another script (the run cache, which
        then also fills this script's rows file); None if it still has to run. Loads no model."""
        config = canonical(make_config(overrides, level), seed)
        row = self.store.get(name, level, seed, split)
        if row is None:  # stored under another name (e.g. one spelled with an earlier release's option names)
            row = self.store.find_config(config, level, seed, split)
            if row is not None:
                self.store.alias(name, row)
        if row is not None:
            stored = canonical(row["config"], seed) if "config" in row else None
            if stored is not None and stored != config:
                raise ValueError(f"{self.store.path}: row {name!r} {level} seed {seed} {split} was run with another "
                                 f"config ({stored}; now {config}: did a library default change?). "
                                 "Delete its rows or pass another rows file.")
            if row.get("revision", 0) != revision(config):
                raise ValueError(f"{self.store.path}: row {name!r} {level} seed {seed} {split} was run before the "
                                 f"library changed what this config does (benchmarks/protocol.py REVISIONS, "
                                 f"revision {revision(config)}). Delete its rows or pass another rows file.")
            return row
        cached = self.cache.get(config, split)
        if cached is None:
            return None
        row = {"name": name, "level": level, "seed": seed, "split": split, "overrides": overrides,
               **{k: cached[k] for k in RunCache.FIELDS if k in cached}, "config": config,
               **revision_field(config)}
        self.store.add(row)
        logger.info("%s %s seed %d %s: PPL %.3f from the run cache", name, level, seed, split, row["ppl"])
        return row

    def run(self, name: str, overrides: dict[str, Any], level: str, seed: int, split: str) -> dict:
        """Prune the dense model with the config of `overrides` at `level` (`make_config`) on the split's
        calibration samples of `seed` and score it; returns the finished row if this run is already done.

        `overrides` must name the method unless it is d2prune (e.g. `{"method": "sparsegpt"}`).
        """
        row = self.finished(name, overrides, level, seed, split)
        if row is not None:
            return row
        dense = self.dense(split)
        config = make_config(overrides, level)
        calib = self.calibration(split, seed)
        model = self.dense_model()
        pruner = D2Pruner(config)
        start = time.perf_counter()
        pruner.prune(model, calib)
        seconds = time.perf_counter() - start
        ppl = self.score(split)
        key = canonical(config, seed)
        row = {"name": name, "level": level, "seed": seed, "split": split, "overrides": overrides, "ppl": ppl,
               "ratio": ppl / dense, "seconds": seconds, "config": key, **revision_field(key)}
        report = pruner.report
        if report is not None and report.attention:
            row["unupdated"] = "".join(f"{p}{n}" for p, n in report.unupdated_counts().items())
        if report is not None and report.block_sparsity:
            row["block_sparsity"] = [round(b, 6) for b in report.block_sparsity]
        self.store.add(row)
        self.cache.add(row["config"], split, row)
        logger.info("%s %s seed %d %s: PPL %.3f (x%.3f dense) in %.1f s", name, level, seed, split, ppl,
                    row["ratio"], seconds)
        return row


def stored_config(config: dict) -> dict:
    """A flat config stored by an earlier release, the fields of `PREDATING_VALUES` it lacks set to what every run had
    before they existed (a preset that now sets one must not claim the older runs); today's format unchanged."""
    return config if "method_options" in config else {**PREDATING_VALUES, **config}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}.")


def mean_std(values: Sequence[float], digits: int = 2) -> str:
    """"m" for one value, "m ± s" (sample std) for more."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def set_threads(threads: Optional[int]) -> None:
    if threads:
        torch.set_num_threads(threads)


def repo_relative(path: Optional[Path]) -> str:
    """`path` relative to the repository (as written in the results files), or as given when outside it."""
    if path is None:
        return "-"
    try:
        return str(Path(path).resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return str(path)


#: a results file's hand-written part starts at this line; regenerating the table keeps it
HAND_NOTES = "<!-- hand-written notes below: kept when the table above is regenerated -->"


def write_report(text: str, output: Optional[str]) -> str:
    """Write a results table to `output` (when given, creating its folder) and return it. What the file holds from
    the `HAND_NOTES` line on is written after the new table: notes are not lost to a rerun of the script."""
    if output:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        old = path.read_text(encoding="utf-8") if path.is_file() else ""
        notes = old[old.index(HAND_NOTES):] if HAND_NOTES in old else ""
        path.write_text(text + ("\n" + notes if notes else ""), encoding="utf-8")
    return text


def write_section(name: str, text: str, path: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Put `text` between the lines `<!-- results:NAME -->` and `<!-- /results:NAME -->` of the users' results page
    (`RESULTS_DOC`), leaving the rest of the file as it is; a section the page does not have yet is appended."""
    path = Path(path) if path is not None else RESULTS_DOC
    start, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    body = f"{start}\n{text.strip()}\n{end}"
    if start in old:
        first = old.index(start)
        if end not in old[first:]:
            raise ValueError(f"{path}: {start} has no closing {end}; add it where the section ends.")
        last = old.index(end, first) + len(end)
        new = old[:first] + body + old[last:]
    else:
        new = old.rstrip("\n") + ("\n\n" if old.strip() else "") + body + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(path)
    return path


def results_section(text: str, regenerate: str) -> str:
    """A results file's table for the users' page (`write_section`): its text without the title and the run line
    (the first two paragraphs; the page says what the benchmark is), and the command that regenerates it."""
    body = text.split("\n\n", 2)[-1]
    return body.rstrip() + f"\n\nRegenerate: `{regenerate}`\n"


def add_results_doc_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results-doc", action="store_true",
                        help=f"Also rewrite this benchmark's section of {repo_relative(RESULTS_DOC)} (between its "
                             "`<!-- results:NAME -->` markers; the rest of the page is left as it is).")


def recorded_command(script: str, argv: Optional[Sequence[str]], drop: Sequence[str] = ()) -> str:
    """The command line a results file names: `python benchmarks/SCRIPT ARGS`, without `--results-doc` (it writes
    the users' page, not the table) and the flags in `drop`."""
    args = argv if argv is not None else sys.argv[1:]
    return f"python benchmarks/{script}" + "".join(f" {a}" for a in args if a not in ("--results-doc", *drop))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python benchmarks/protocol.py --import-rows FILE... --threads N`: add the config-carrying rows of row files
    (of the default protocol, run with N torch threads) to the shared run cache."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--import-rows", nargs="+", required=True)
    parser.add_argument("--threads", type=int, required=True, help="The torch threads those rows ran with.")
    args = parser.parse_args(argv)
    settings = ProtocolSettings()
    cache = RunCache.shared(settings)
    added = 0
    for path in args.import_rows:
        data = json.loads(Path(path).read_text())
        if not settings.matches(data.get("protocol")):
            raise SystemExit(f"{path} holds rows of another protocol: not imported.")
        for row in data["rows"]:
            if "config" in row and cache.get(row["config"], row["split"], args.threads) is None:
                cache.add(row["config"], row["split"], row, args.threads)
                added += 1
    print(f"{added} run(s) added to {cache.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
