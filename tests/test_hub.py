"""Save / load / push of pruned checkpoints: plain transformers compatibility, verified sparsity, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tinymodels import calib_batches, make_tiny

from optimum_d2prune import D2PruneConfig, D2Pruner, load_pruned, push_to_hub, save_pruned
from optimum_d2prune.configuration import CONFIG_NAME
from optimum_d2prune.errors import CheckpointError, InputError, OutputPathError
from optimum_d2prune.io import checkpoint_files, read_record


@pytest.fixture(scope="module")
def pruned_24():
    """A tiny LLaMA pruned 2:4 with D²Prune (attention choices recorded) and its pruner."""
    model = make_tiny("llama")
    pruner = D2Pruner(D2PruneConfig(mask_structure="2:4", method_options={"skip_update": "dynamic", "refit_steps": 0}))
    pruner.prune(model, calib_batches(num=2))
    return model, pruner


def _zero_masks(model):
    return {n: (p == 0) for n, p in model.named_parameters() if "layers" in n and p.dim() == 2}


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def test_save_writes_plain_checkpoint_and_record(pruned_24, tmp_path):
    model, pruner = pruned_24
    out = pruner.save(model, tmp_path / "ckpt", calibration={"source": "random", "num_samples": 2},
                      evaluation={"perplexity": {"dense": 10.0, "pruned": 12.5}}, command="python prune.py")
    files = set(checkpoint_files(out))
    assert {"config.json", "model.safetensors", CONFIG_NAME, "README.md"} <= files
    assert not any(f.endswith(".bin") for f in files)
    record = read_record(out)
    assert record["config"]["mask_structure"] == "2:4"
    assert set(record["sparsity"]) == set(pruner.report.sparsity_by_module())
    assert all(abs(v - 0.5) < 1e-9 for v in record["sparsity"].values())
    assert [a["block"] for a in record["attention"]] == [0, 1]
    assert {a["chosen"] for a in record["attention"]} <= {"q", "k", "v"}
    assert {"optimum_d2prune", "torch", "transformers"} <= set(record["versions"])
    assert record["command"] == "python prune.py"
    # the small summary in config.json round-trips through transformers
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["d2prune"]["mask_structure"] == "2:4"
    assert "quantization_config" not in config_json
    assert not hasattr(model.config, "d2prune")  # the user's model is left as it was
    card = (out / "README.md").read_text()
    for tag in ("d2prune", "pruned", "sparse", "sparsity-2of4"):
        assert f"- {tag}" in card
    assert "| perplexity | 10.0000 | 12.5000 |" in card and "python prune.py" in card
    assert _siblings(out) == []  # no temporary folder left behind


def test_plain_transformers_load_keeps_zeros(pruned_24, tmp_path):
    from transformers import AutoModelForCausalLM

    model, pruner = pruned_24
    out = pruner.save(model, tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.d2prune["method"] == "d2prune"
    original, reloaded = dict(model.named_parameters()), dict(loaded.named_parameters())
    for name, mask in _zero_masks(model).items():
        assert torch.equal(reloaded[name] == 0, mask), name
        assert torch.equal(reloaded[name], original[name]), name
    again, config = load_pruned(out)
    assert config == pruner.config
    x = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        assert torch.allclose(again(x).logits, model(x).logits, atol=1e-5)


def test_load_detects_lost_sparsity_and_nm(pruned_24, tmp_path):
    model, pruner = pruned_24
    out = pruner.save(model, tmp_path / "ckpt")
    weights = load_file(out / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    # keep 50% zeros but break 2:4: all zeros in the first half of each row
    broken = torch.randn_like(weights[name])
    broken[:, : broken.shape[1] // 2] = 0
    weights[name] = broken
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"up_proj.*2:4"):
        load_pruned(out)
    weights[name] = torch.randn_like(weights[name])  # zeros gone
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj: 0\.0000% zeros, 50\.0000% recorded"):
        load_pruned(out)
    model2, _ = load_pruned(out, verify=False)  # an explicit opt-out loads the weights as they are in the file
    assert torch.equal(model2.get_submodule("model.layers.1.mlp.up_proj").weight, weights[name])


def test_existing_output_refused_and_overwrite_is_atomic(pruned_24, tmp_path, monkeypatch):
    model, pruner = pruned_24
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "mine.txt").write_text("user data")
    with pytest.raises(OutputPathError, match="overwrite"):
        pruner.save(model, mine)
    with pytest.raises(OutputPathError, match="did not write"):  # `overwrite` replaces only this tool's outputs
        pruner.save(model, mine, overwrite=True)
    assert sorted(p.name for p in mine.iterdir()) == ["mine.txt"] and (mine / "mine.txt").read_text() == "user data"
    out = pruner.save(model, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # a failure mid-save leaves the old folder as it was and no temporary folder
    monkeypatch.setattr(type(model), "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        pruner.save(model, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and _siblings(out) == []
    monkeypatch.undo()
    pruner.save(model, out, overwrite=True, command="second save")
    assert read_record(out)["command"] == "second save" and _siblings(out) == []
    (tmp_path / "empty").mkdir()
    pruner.save(model, tmp_path / "empty")  # an empty folder is fine
    assert (tmp_path / "empty" / CONFIG_NAME).is_file()
    with pytest.raises(OutputPathError, match="not a folder"):
        pruner.save(model, out / CONFIG_NAME, overwrite=True)


def test_gguf_quantization_config_is_not_saved(pruned_24, tmp_path):
    from transformers.utils.quantization_config import GgufConfig

    model, pruner = pruned_24
    gguf = GgufConfig(gguf_file="model.gguf", dequantize=True)
    model.config.quantization_config = gguf
    try:
        out = pruner.save(model, tmp_path / "ckpt")
        assert model.config.quantization_config is gguf  # restored on the user's model
    finally:
        del model.config.quantization_config
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    load_pruned(out)
    model.config.quantization_config = GgufConfig(gguf_file="model.gguf", dequantize=False)  # packed weights
    try:
        with pytest.raises(ValueError, match="dequantize=True"):
            pruner.save(model, tmp_path / "packed")
    finally:
        del model.config.quantization_config
    assert not (tmp_path / "packed").exists()


def test_save_without_report_measures_the_model(tmp_path):
    model = make_tiny("opt")
    D2Pruner(method="wanda", sparsity=0.5).prune(model, calib_batches(num=1))
    out = save_pruned(model, tmp_path / "wanda", D2PruneConfig(method="wanda", sparsity=0.5))
    record = read_record(out)
    assert len(record["sparsity"]) == 12 and record["attention"] == []
    load_pruned(out)


def test_bad_input_fails_before_writing(pruned_24, tmp_path):
    model, pruner = pruned_24
    with pytest.raises(TypeError, match="D2PruneConfig"):
        save_pruned(model, tmp_path / "x", config={"sparsity": 0.5})
    with pytest.raises(TypeError, match="save_pretrained"):
        save_pruned(torch.nn.Linear(2, 2), tmp_path / "x", pruner.config)
    with pytest.raises(ValueError, match="relative"):
        pruner.save(model, tmp_path / "x", extra_files={"../escape.txt": "x"})
    assert not (tmp_path / "x").exists()
    with pytest.raises(CheckpointError, match="not a checkpoint saved by optimum-d2prune"):
        load_pruned(tmp_path)


@pytest.fixture
def hub_api(monkeypatch):
    """The real `HfApi`, autospecced (every call is checked against its signature; nothing reaches the network):
    `HfApi(...)` returns `hub_api`, whose methods record their calls."""
    from unittest import mock

    import huggingface_hub
    from huggingface_hub import HfApi

    api = mock.create_autospec(HfApi, instance=True)
    api.upload_folder.return_value = mock.Mock(commit_url="https://huggingface.co/someone/tiny-2of4/commit/abc")
    api.whoami.return_value = {"name": "someone", "orgs": [{"name": "team", "roleInOrg": "write"}],
                               "auth": {"accessToken": {"role": "write"}}}
    factory = mock.create_autospec(HfApi, return_value=api)
    monkeypatch.setattr(huggingface_hub, "HfApi", factory)
    api.factory = factory
    return api


def test_push_folder_uploads_exact_files(pruned_24, tmp_path, hub_api, tokenizer_dir):
    from transformers import AutoTokenizer

    model, pruner = pruned_24
    out = pruner.save(model, tmp_path / "ckpt", tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir),
                      extra_files={"report.html": "<html></html>"})
    (out / ".cache").mkdir()  # hidden files are never uploaded
    (out / ".cache" / "junk").write_text("x")
    url = push_to_hub(out, "someone/tiny-2of4", private=True, token="hf_test")
    assert url == "https://huggingface.co/someone/tiny-2of4/commit/abc"
    hub_api.factory.assert_called_once_with(token="hf_test")
    hub_api.create_repo.assert_called_once_with("someone/tiny-2of4", private=True, exist_ok=True, repo_type="model")
    upload_kwargs = hub_api.upload_folder.call_args.kwargs
    expected = sorted(["README.md", "config.json", CONFIG_NAME, "generation_config.json", "model.safetensors",
                       "report.html", "tokenizer.json", "tokenizer_config.json"]
                      + (["chat_template.jinja"] if (out / "chat_template.jinja").exists() else []))
    assert upload_kwargs["allow_patterns"] == expected
    assert upload_kwargs["repo_id"] == "someone/tiny-2of4" and upload_kwargs["folder_path"] == str(out)
    assert (out / ".cache" / "junk").is_file() and ".cache/junk" not in upload_kwargs["allow_patterns"]


def test_push_model_and_bad_input(pruned_24, tmp_path, hub_api):
    model, pruner = pruned_24
    push_to_hub(model, "someone/tiny", config=pruner.config, report=pruner.report)
    assert hub_api.create_repo.call_args.kwargs["private"] is False
    assert CONFIG_NAME in hub_api.upload_folder.call_args.kwargs["allow_patterns"]
    hub_api.reset_mock()
    with pytest.raises(InputError, match="user/name"):
        push_to_hub(tmp_path, "no-slash")
    with pytest.raises(CheckpointError, match=CONFIG_NAME):
        push_to_hub(tmp_path, "someone/tiny")
    with pytest.raises(InputError, match="config="):
        push_to_hub(model, "someone/tiny")
    assert hub_api.mock_calls == []  # nothing reached the Hub


def test_card_inherits_base_model_and_license(tmp_path):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    source = tmp_path / "base"
    make_tiny("llama").save_pretrained(source)
    (source / "README.md").write_text("---\nlicense: mit\nbase_model: someorg/tiny-base\n---\n# tiny\n")
    model = AutoModelForCausalLM.from_pretrained(source)
    pruner = D2Pruner(method="magnitude", sparsity=0.6)
    pruner.prune(model, calib_batches(num=1))
    data = ModelCard.load(pruner.save(model, tmp_path / "out") / "README.md").data
    assert (data.license, data.base_model) == ("mit", "someorg/tiny-base")
    assert {"d2prune", "pruned", "sparse", "sparsity-60", "magnitude"} <= set(data.tags)
