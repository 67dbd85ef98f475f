"""`optimum-cli d2prune` (the real binary, in a subprocess) and `python -m optimum_d2prune` on a tiny saved model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tinymodels import FIXTURES

from optimum_d2prune import D2PruneConfig, RuntimeOptions, load_pruned
from optimum_d2prune.commands import main
from optimum_d2prune.configuration import CONFIG_NAME
from optimum_d2prune.errors import D2PruneError

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    # the worktree first, so that its optimum/commands/register and package are the ones found
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def _optimum_cli() -> str:
    exe = shutil.which("optimum-cli") or str(Path(sys.executable).parent / "optimum-cli")
    if not Path(exe).exists():
        pytest.fail("optimum-cli not found next to the Python interpreter: install optimum")
    return exe


@pytest.fixture(scope="module")
def eval_text():
    return FIXTURES / "pruning_notes.txt"


def test_registration_is_light_and_listed():
    code = ("import sys, optimum.commands.register.register_d2prune as r; "
            "assert r.REGISTER_COMMANDS[0].COMMAND.name == 'd2prune'; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], env=_env(), check=True, timeout=60)
    help_text = subprocess.run([_optimum_cli(), "--help"], env=_env(), capture_output=True, text=True, timeout=60)
    assert help_text.returncode == 0 and "d2prune" in help_text.stdout
    assert not (REPO / "optimum" / "commands" / "register" / "__init__.py").exists()  # a PEP 420 namespace


def test_optimum_cli_end_to_end(tiny_checkpoint, eval_text, tmp_path):
    out = tmp_path / "pruned"
    cmd = [_optimum_cli(), "d2prune", "--model", str(tiny_checkpoint), "--output-dir", str(out), "--sparsity", "0.5",
           "--calibration", "self", "--num-samples", "2", "--seq-len", "16", "--eval", str(eval_text),
           "--eval-seq-len", "32", "--eval-max-windows", "2", "--eval-dense", "--device", "cpu",
           "--strategy", "global"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| sparsity (pruned layers)" in proc.stdout and "50.00%" in proc.stdout  # the summary table
    assert "block" in proc.stderr  # tqdm progress over blocks
    assert {"config.json", "model.safetensors", CONFIG_NAME, "README.md", "report.html", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    record = json.loads((out / CONFIG_NAME).read_text())
    assert record["calibration"]["source"] == "self" and record["command"].startswith("optimum-cli d2prune --model")
    ppl = next(v for k, v in record["evaluation"].items() if k.startswith("perplexity"))
    assert set(ppl) == {"dense", "pruned"}
    assert record["config"]["method_options"]["strategy"] == "global"
    assert set(record["report"]["global_search"]) == {"q", "k", "v", "none"}
    assert "data:image/png;base64," in (out / "report.html").read_text()
    model, config = load_pruned(out)
    assert config.method == "d2prune" and config.sparsity == 0.5
    # the user's folder is never overwritten without --overwrite, and nothing is loaded before refusing
    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr


def test_python_m_with_file_calibration_and_nm(tiny_checkpoint, tmp_path):
    out = tmp_path / "pruned-2of4"
    cmd = [sys.executable, "-m", "optimum_d2prune", "--model", str(tiny_checkpoint), "--output-dir", str(out),
           "--mask-structure", "2:4", "--method", "sparsegpt", "--calibration", str(FIXTURES / "pruning_notes.jsonl"),
           "--num-samples", "2", "--seq-len", "16", "--eval", "none", "--device", "cpu"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / CONFIG_NAME).read_text())
    assert record["mask_structure"] == "2:4" and record["calibration"]["source"] == "pruning_notes.jsonl"
    assert record["evaluation"] == {}
    load_pruned(out)  # verifies the 2:4 pattern of every module


def test_python_m_zero_shot_on_local_tasks(tiny_checkpoint, shared_data, tmp_path):
    out = tmp_path / "pruned-zero-shot"
    cmd = [sys.executable, "-m", "optimum_d2prune", "--model", str(tiny_checkpoint), "--output-dir", str(out),
           "--method", "magnitude", "--num-samples", "2", "--seq-len", "16", "--eval", "none", "--zero-shot",
           "rte,winogrande", "--zero-shot-data",
           str(shared_data / "zeroshot"), "--zero-shot-limit", "2", "--batch-size", "2", "--device", "cpu"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / CONFIG_NAME).read_text())
    assert {"rte (acc)", "winogrande (acc)", "zero-shot mean"} <= set(record["evaluation"])
    assert "zero-shot mean" in proc.stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mask-structure", "3:3"], "N:M"),
        (["--sparsity", "1.5"], "sparsity"),
        (["--calibration", "no/such/file.jsonl"], "--calibration"),
        (["--eval", "missing.txt"], "--eval"),
        (["--num-samples", "0"], "--num-samples"),
        (["--zero-shot", "boolq,nope", "--zero-shot-data", "."], "nope"),
        (["--push-to-hub", "not a repo"], "user/name"),
        (["--private"], "--push-to-hub"),
    ],
)
def test_bad_arguments_fail_before_loading(extra, message, tmp_path, capsys, monkeypatch):
    import optimum_d2prune.models as models

    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("loaded a model despite bad input"))
    code = main(["--model", "some/model", "--output-dir", str(tmp_path / "out"), *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_job_too_large_for_the_device_is_refused_before_the_model_moves(tiny_checkpoint, tmp_path, capsys,
                                                                          monkeypatch):
    """The estimate is checked against the device's free memory after loading (the config is needed) and before
    `model.to(device)`; the refusal prints the per-phase estimate and what to change, and writes nothing."""
    import torch

    import optimum_d2prune.memory.estimate as memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 64 * 2**10)  # 64 KiB free
    monkeypatch.setattr(torch.nn.Module, "to", lambda *a, **k: pytest.fail("moved the model before refusing"))
    out = tmp_path / "out"
    code = main(["--model", str(tiny_checkpoint), "--output-dir", str(out), "--calibration", "self",
                 "--num-samples", "2", "--seq-len", "16", "--eval", "none", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "GiB are free" in err and "Try:" in err and "| statistics |" in err
    assert not out.exists()


def test_cli_push_to_hub_uses_hub_api(tiny_checkpoint, tmp_path, monkeypatch):
    from unittest import mock

    import huggingface_hub
    from huggingface_hub import HfApi

    import optimum_d2prune.io.hub as io_hub

    api = mock.create_autospec(HfApi, instance=True)  # the real API's signatures; nothing reaches the network
    api.whoami.return_value = {"name": "me", "orgs": [], "auth": {"accessToken": {"role": "write"}}}
    api.upload_folder.return_value = mock.Mock(commit_url="https://huggingface.co/me/tiny/commit/1")
    monkeypatch.setattr(huggingface_hub, "HfApi", mock.create_autospec(HfApi, return_value=api))
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_stored")
    monkeypatch.setattr(io_hub, "hub_offline_reason", lambda timeout=3.0: None)
    out = tmp_path / "pushed"
    code = main(["--model", str(tiny_checkpoint), "--output-dir", str(out), "--method", "magnitude",
                 "--calibration", "self", "--num-samples", "1", "--seq-len", "8", "--device", "cpu",
                 "--push-to-hub", "me/tiny", "--private", "--no-report"])
    assert code == 0
    api.whoami.assert_called_once_with()  # checked before the model loaded
    api.create_repo.assert_called_once_with("me/tiny", private=True, exist_ok=True, repo_type="model")
    uploaded = api.upload_folder.call_args.kwargs["allow_patterns"]
    assert CONFIG_NAME in uploaded and "model.safetensors" in uploaded and "report.html" not in uploaded


#: command-line flags -> the config they must give (`--` flags generated from the dataclasses, and the flags of
#: earlier releases, which keep working)
FLAG_CASES = {
    "high sparsity": (["--sparsity", "0.8", "--preset", "max_quality", "--reconstruction-targets", "all",
                       "--reconstruction-reference", "model", "--admm-steps", "12"],
                      D2PruneConfig(sparsity=0.8, preset="max_quality", method_options={"admm_steps": 12},
                                    reconstruction_options={"targets": "all", "reference": "model"})),
    "preset without its reconstruction": (["--sparsity", "0.8", "--preset", "max_quality", "--no-reconstruction"],
                                          D2PruneConfig(sparsity=0.8, preset="max_quality", reconstruction=False)),
    "owl options": (["--sparsity", "0.7", "--allocation", "owl", "--owl-deviation", "0.05",
                     "--owl-outlier-threshold", "3"],
                    D2PruneConfig(sparsity=0.7, allocation="owl",
                                  allocation_options={"deviation": 0.05, "outlier_threshold": 3.0})),
    "method options": (["--skip-update", "v", "--strategy", "global", "--kl-samples", "2", "--refit-steps", "3"],
                       D2PruneConfig(method_options={"skip_update": "v", "strategy": "global", "kl_samples": 2,
                                                    "refit_steps": 3})),
    "sparsegpt refit": (["--method", "sparsegpt", "--refit-steps", "4", "--no-refit-budget"],
                        D2PruneConfig(method="sparsegpt", method_options={"refit_steps": 4, "refit_budget": False})),
    "reconstruction refit": (["--reconstruction", "--reconstruction-refit-steps", "4"],
                             D2PruneConfig(reconstruction=True, reconstruction_options={"refit_steps": 4})),
    "flags of earlier releases": (["--sparsity", "0.8", "--sparsity-allocation", "owl", "--block-reconstruction",
                                   "--dynamic-strategy", "layer", "--attention-update", "all", "--kl-num-samples",
                                   "2"],
                                  D2PruneConfig(sparsity=0.8, allocation="owl", reconstruction=True,
                                                method_options={"strategy": "layer", "skip_update": "none",
                                                                "kl_samples": 2})),
    "attention-update none": (["--attention-update", "none"], D2PruneConfig(method_options={"skip_update": "qkv"})),
    "runtime": (["--device", "cpu", "--offload-activations", "--kl-chunk-mib", "8", "--on-nonfinite", "skip"],
                D2PruneConfig()),
}


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_flags_reach_the_config(case, tmp_path):
    from optimum_d2prune.commands.checks import check_arguments
    from optimum_d2prune.commands.d2prune import build_parser

    flags, expected = FLAG_CASES[case]
    args = build_parser().parse_args(["--model", "some/model", "--output-dir", str(tmp_path / "out"), *flags])
    config = check_arguments(args)
    assert config == expected
    if case == "runtime":  # not part of what the run does (not compared), but set
        assert config.runtime == RuntimeOptions(device="cpu", offload_activations=True, kl_chunk_mib=8,
                                                on_nonfinite="skip")


@pytest.mark.parametrize("flags, message", [
    (["--method", "wanda", "--refit-steps", "4"], "--refit-steps is not an option of method 'wanda'"),
    (["--skip-update", "v", "--attention-update", "all"], "--skip-update or --attention-update, not both"),
    (["--sparsity", "0.5", "--mask-structure", "2:4"], "--sparsity (unstructured) or --mask-structure (N:M)"),
    (["--mask-structure", "2:4", "--allocation", "owl"], "needs unstructured sparsity"),
])
def test_conflicting_flags_are_refused(flags, message, tmp_path):
    from optimum_d2prune.commands.checks import check_arguments
    from optimum_d2prune.commands.d2prune import build_parser

    args = build_parser().parse_args(["--model", "some/model", "--output-dir", str(tmp_path / "out"), *flags])
    with pytest.raises(D2PruneError) as info:
        check_arguments(args)
    assert message in str(info.value)


def test_cli_shrink_saves_a_smaller_checkpoint(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "shrunk"
    code = main(["--model", str(tiny_checkpoint), "--output-dir", str(out), "--method", "shrink", "--sparsity",
                 "0.25", "--mode", "channels", "--calibration", "self", "--num-samples", "2", "--seq-len", "32",
                 "--eval", "none"])
    assert code == 0
    dense = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    shrunk = AutoModelForCausalLM.from_pretrained(out)
    assert shrunk.config.intermediate_size < dense.config.intermediate_size
    assert json.loads((out / "structured_shrink.json").read_text())["report"]["mode"] == "channels"
