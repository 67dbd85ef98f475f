"""A user's first hour with the CLI: the default run needs no data, every bad input is refused before any pruning
(with one actionable line), and finished work survives a later failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tinymodels import FIXTURES

from optimum_d2prune import load_pruned
from optimum_d2prune.commands import main
from optimum_d2prune.configuration import CONFIG_NAME
from optimum_d2prune.pruner import D2Pruner

TINY_RUN = ["--num-samples", "2", "--seq-len", "16", "--eval-seq-len", "16", "--device", "cpu"]


@pytest.fixture
def no_pruning(monkeypatch):
    """Any call of `D2Pruner.prune` fails the test: the error under test must come before pruning starts."""
    monkeypatch.setattr(D2Pruner, "prune", lambda *a, **k: pytest.fail("pruning started despite bad input"))


@pytest.fixture
def no_model_load(monkeypatch, no_pruning):
    import optimum_d2prune.models as models

    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("the model loaded despite bad input"))


@pytest.fixture
def hub_unreachable(monkeypatch):
    """The Hub endpoint is a closed port on this machine: a real, immediate connection refusal."""
    from huggingface_hub import constants

    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_default_run_needs_no_data(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "pruned"
    code, stdout, stderr = _run(capsys, "--model", str(tiny_checkpoint), "--output-dir", str(out), "--eval-samples",
                                "2", *TINY_RUN)
    assert code == 0, stderr[-3000:]
    record = json.loads((out / CONFIG_NAME).read_text())
    assert record["calibration"]["source"] == "self"
    (name, ppl), = record["evaluation"].items()
    assert "held-out self-generated text, 2 x 16 tokens" in name and set(ppl) == {"dense", "pruned"}
    last = stdout.strip().splitlines()[-1]
    assert last.startswith(f"Saved to {out}: 50.00% zeros") and f"{ppl['dense']:.3f} -> {ppl['pruned']:.3f}" in last
    for bar in ("held-out text", "perplexity (dense)", "self-calibration", "d2prune 50%", "saving pruned",
                "perplexity (pruned)"):
        assert bar in stderr, bar  # a progress bar (with its ETA) for every long step
    assert "perplexity" in (out / "README.md").read_text()  # the evaluation reached the model card
    load_pruned(out)


def test_cpu_defaults_are_sized_for_the_device():
    from optimum_d2prune.commands.checks import DEFAULT_SIZES, resolve_sizes
    from optimum_d2prune.commands.d2prune import build_parser

    args = build_parser().parse_args(["--model", "m", "--output-dir", "o"])
    resolve_sizes(args, "cpu")
    assert (args.num_samples, args.seq_len, args.eval_samples) == DEFAULT_SIZES["cpu"] == (32, 512, 8)
    args = build_parser().parse_args(["--model", "m", "--output-dir", "o"])
    resolve_sizes(args, "cuda:0")
    assert (args.num_samples, args.seq_len) == (128, 2048)  # the paper's calibration size


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# (extra arguments, text expected in the one-line error) for inputs refused before the model loads
BEFORE_LOADING = {
    "eval file missing": (["--eval", "no/such/eval.txt"], "--eval 'no/such/eval.txt': no such file"),
    "eval file empty": (["--eval", "{empty}"], "is empty"),
    "calibration file missing": (["--calibration", "missing.jsonl"], "--calibration 'missing.jsonl': no such file"),
    "calibration file empty": (["--calibration", "{empty}"], "is empty"),
    "output inside a file": (["--output-dir", "{file}/out"], "is a file, not a folder"),
    "output on a read-only filesystem": (["--output-dir", "/proc/d2prune-out"], "cannot write in /proc"),
    "unknown model id": (["--model", "smollm3"], "Did you mean \"smollm2\"?"),
    "mistyped hub id": (["--model", "HuggingFaceTB/SmolLM2-135M-Instrukt"], "Did you mean HuggingFaceTB/SmolLM2"),
    "no such local folder": (["--model", "./no/such/model"], "no such file or folder"),
}


@pytest.mark.parametrize("case", sorted(BEFORE_LOADING))
def test_refused_before_the_model_loads(case, tiny_checkpoint, tmp_path, capsys, no_model_load, hub_unreachable):
    extra, expected = BEFORE_LOADING[case]
    empty = _write(tmp_path, "empty.txt", "\n \n")
    extra = [a.format(empty=empty, file=empty) for a in extra]
    argv = ["--model", str(tiny_checkpoint), "--output-dir", str(tmp_path / "out"), *TINY_RUN]
    code, _, stderr = _run(capsys, *argv, *extra)
    assert code == 2, stderr
    assert expected in stderr and stderr.startswith("error: ") and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1  # one line
    assert not (tmp_path / "out").exists()


def test_unknown_model_names_the_alternatives(tmp_path, capsys, no_model_load, hub_unreachable):
    code, _, stderr = _run(capsys, "--model", "smollm3", "--output-dir", str(tmp_path / "out"))
    assert code == 2
    for alternative in ("'smollm3'", "local folder", ".gguf", '"smollm2"', "offline"):
        assert alternative in stderr, alternative


# inputs that need the tokenizer to be refused (it loads in a second; the model must not)
TOO_SHORT = {
    "calibration documents too short": (["--calibration", str(FIXTURES / "pruning_notes.jsonl"), "--seq-len", "600"],
                                        "no document has more than --seq-len=600 tokens"),
    "calibration text too short": (["--calibration", "{short}", "--seq-len", "64"], "fewer than the 65"),
    "eval text too short": (["--eval", "{short}", "--eval-seq-len", "64"], "fewer than the 64"),
    "hub calibration offline": (["--calibration", "c4"], "`self` to calibrate on text the model generates"),
    "hub evaluation offline": (["--eval", "wikitext2"], "cannot be reached"),
}


def test_sequences_longer_than_the_model_are_refused_before_generation(tiny_checkpoint, tmp_path, capsys, no_pruning,
                                                                        monkeypatch):
    import optimum_d2prune.calibration as calibration

    monkeypatch.setattr(calibration, "self_generated_calibration", lambda *a, **k: pytest.fail("generated text"))
    code, _, stderr = _run(capsys, "--model", str(tiny_checkpoint), "--output-dir", str(tmp_path / "o"), "--seq-len",
                           "4096", "--device", "cpu")
    assert code == 2 and "--seq-len 4096 is longer than the model's max_position_embeddings=256" in stderr


@pytest.mark.parametrize("case", sorted(TOO_SHORT))
def test_refused_once_the_tokenizer_is_loaded(case, tiny_checkpoint, tmp_path, capsys, no_model_load, hub_unreachable):
    extra, expected = TOO_SHORT[case]
    short = _write(tmp_path, "short.txt", "Only a few words of text here.")
    extra = [a.format(short=short) for a in extra]
    argv = ["--model", str(tiny_checkpoint), "--output-dir", str(tmp_path / "out"), "--device", "cpu", *extra]
    code, _, stderr = _run(capsys, *argv)
    assert code == 2, stderr
    assert expected in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


def test_hub_offline_is_said_at_once(tiny_checkpoint, tmp_path, capsys, no_model_load, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, stderr = _run(capsys, "--model", str(tiny_checkpoint), "--output-dir", str(tmp_path / "o"),
                           "--calibration", "c4")
    assert code == 2 and "HF_HUB_OFFLINE is set" in stderr and "local .jsonl file" in stderr


def test_evaluation_failure_keeps_the_saved_model(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import optimum_d2prune.evaluation as evaluation

    real = evaluation.perplexity

    def failing_after_pruning(*args, desc: str = "perplexity", **kwargs):
        if "pruned" in desc:
            raise RuntimeError("the evaluation broke")
        return real(*args, desc=desc, **kwargs)

    monkeypatch.setattr(evaluation, "perplexity", failing_after_pruning)
    out = tmp_path / "pruned"
    code, _, stderr = _run(capsys, "--model", str(tiny_checkpoint), "--output-dir", str(out), "--eval-samples", "2",
                           *TINY_RUN)
    assert code == 1
    assert "the evaluation broke" in stderr and f"saved and loadable at {out}" in stderr
    log = Path(stderr.split("Traceback: ")[1].strip())
    assert "RuntimeError: the evaluation broke" in log.read_text()
    model, config = load_pruned(out)  # the pruned model was saved before the evaluation ran
    record = json.loads((out / CONFIG_NAME).read_text())
    (ppl,) = record["evaluation"].values()
    assert set(ppl) == {"dense"}  # what was measured before the failure is kept


def test_internal_error_gives_a_log_not_a_user_error(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    def broken(self, model, calib):
        raise KeyError("an internal bug")

    monkeypatch.setattr(D2Pruner, "prune", broken)
    code, _, stderr = _run(capsys, "--model", str(tiny_checkpoint), "--output-dir", str(tmp_path / "o"), "--eval",
                           "none", "--num-samples", "2", "--seq-len", "16", "--device", "cpu")
    assert code == 1 and "internal error: KeyError: 'an internal bug'" in stderr
    log = Path(stderr.split("The traceback is in ")[1].split(";")[0])
    assert "Traceback" in log.read_text() and "an internal bug" in log.read_text()
    assert not (tmp_path / "o").exists()


def test_smollm2_alias_is_case_insensitive():
    from optimum_d2prune.models import SMOLLM2_GGUF, resolve_model_source

    for alias in ("smollm2", "SmolLM2", "SMOLLM2"):
        source = resolve_model_source(alias)
        assert source.gguf_file == SMOLLM2_GGUF and source.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_value_error_inside_another_library_is_an_internal_error(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import numpy as np

    def broken(self, model, calib):
        np.array_split(np.arange(3), 0)  # raises ValueError inside numpy: a bug of ours, not bad input

    monkeypatch.setattr(D2Pruner, "prune", broken)
    code, _, stderr = _run(capsys, "--model", str(tiny_checkpoint), "--output-dir", str(tmp_path / "o"), "--eval",
                           "none", "--num-samples", "2", "--seq-len", "16", "--device", "cpu")
    assert code == 1 and "internal error: ValueError" in stderr and "The traceback is in" in stderr

