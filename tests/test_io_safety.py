"""Saved checkpoints: nothing a user made is replaced, nothing is lost, records and loads cannot silently lie, the
card cannot be injected into, a push is checked before any work, a resume only continues the same run.

One table per group. Names of `optimum_d2prune.io` are looked up inside each test (`_io`): a checkout that lacks one
fails those cases alone, each for its own reason, instead of the whole file at collection.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Optional
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file
from tinymodels import calib_batches, make_tiny, tiny_llama_for

from optimum_d2prune import D2PruneConfig, D2Pruner, load_pruned, save_pruned
from optimum_d2prune.configuration import CONFIG_NAME
from optimum_d2prune.errors import CheckpointError, InputError, ModelStateError, OutputPathError

TESTS = Path(__file__).resolve().parent
MAGNITUDE = {"method": "magnitude", "sparsity": 0.5}


def _io(name: str):
    return getattr(importlib.import_module("optimum_d2prune.io"), name)


def _tree(root: Path) -> dict[str, str]:
    """Every file under `root` (hidden ones too) -> SHA-256 of its content."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pruned():
    """A tiny LLaMA pruned 50 % by magnitude, and its pruner."""
    model = make_tiny("llama")
    pruner = D2Pruner(D2PruneConfig(**MAGNITUDE))
    pruner.prune(model, calib_batches(num=1))
    return model, pruner


def _loaded_from(folder: Path):
    """A model loaded from `folder` (its `_name_or_path` names it, as after `from_pretrained`)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


# ================================================================ 1. overwrite replaces only this tool's outputs
def _user_folder(root, monkeypatch, pruned):
    (root / "thesis").mkdir()
    (root / "thesis" / "thesis.tex").write_text("\\chapter{Two years of work}")
    return pruned[0], root / "thesis", root / "thesis", "did not write"


def _parent_of_model(root, monkeypatch, pruned):
    make_tiny("llama").save_pretrained(root / "models" / "src")
    return _loaded_from(root / "models" / "src"), root / "models", root / "models", "contains the model being pruned"


def _cwd_holding_model(root, monkeypatch, pruned):
    make_tiny("llama").save_pretrained(root / "work" / "src")
    monkeypatch.chdir(root / "work")
    return _loaded_from(root / "work" / "src"), Path("."), root / "work", "current working directory"


def _home(root, monkeypatch, pruned):
    (root / "home").mkdir()
    (root / "home" / "notes.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(root / "home"))
    return pruned[0], Path("~"), root / "home", "home folder"


def _model_own_output_folder(root, monkeypatch, pruned):
    """Pruning an earlier output again and saving it over itself would delete the model being read."""
    model, pruner = pruned
    src = pruner.save(model, root / "earlier")
    return _loaded_from(src), src, src, "is the model being pruned"


OVERWRITE_CASES = {
    "a user's folder (thesis.tex)": _user_folder,
    "the parent of the model's folder": _parent_of_model,
    "the working directory, holding the model": _cwd_holding_model,
    "the home folder": _home,
    "the model's own folder, an earlier output": _model_own_output_folder,
}


@pytest.mark.parametrize("case", list(OVERWRITE_CASES), ids=list(OVERWRITE_CASES))
def test_overwrite_never_replaces_what_this_tool_did_not_make(case, tmp_path, monkeypatch, pruned):
    model, out, guarded, message = OVERWRITE_CASES[case](tmp_path, monkeypatch, pruned)
    before = _tree(guarded)
    with pytest.raises(OutputPathError, match=message) as err:
        save_pruned(model, out, D2PruneConfig(**MAGNITUDE), overwrite=True)
    assert "Choose" in str(err.value) and "\n" not in str(err.value)  # says what to do, in one line
    assert _tree(guarded) == before


CHECK_CASES = {
    # name: (make the path under tmp_path, overwrite, refusal fragment or None when allowed)
    "the root folder": (lambda root: Path("/"), True, "root folder"),
    "a file": (lambda root: (root / "f.txt").write_text("x") and root / "f.txt", True, "not a folder"),
    "a non-empty folder without overwrite": (lambda root: _earlier_output(root), False, "overwrite=True"),
    "an earlier output with overwrite": (lambda root: _earlier_output(root), True, None),
    "a folder with a broken record": (lambda root: _earlier_output(root, record="{"), True, "did not write"),
    "a new folder": (lambda root: root / "new" / "deeper", False, None),
}


def _earlier_output(root: Path, record: Optional[str] = None) -> Path:
    out = root / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"x")
    (out / CONFIG_NAME).write_text(record or json.dumps({"format_version": 1, "config": {}, "sparsity": {"a": 0.5}}))
    return out


@pytest.mark.parametrize("case", list(CHECK_CASES), ids=list(CHECK_CASES))
def test_check_output_dir(case, tmp_path):
    make, overwrite, refusal = CHECK_CASES[case]
    path = make(tmp_path)
    check_output_dir = _io("check_output_dir")
    if refusal is None:
        assert check_output_dir(path, overwrite) == path.resolve()
    else:
        with pytest.raises(OutputPathError, match=refusal):
            check_output_dir(path, overwrite)


def test_cli_refuses_the_model_parent_as_output_before_loading(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import shutil

    import optimum_d2prune.models as models
    from optimum_d2prune.commands import main

    shutil.copytree(tiny_checkpoint, tmp_path / "models" / "src")
    before = _tree(tmp_path / "models")
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("loaded a model despite bad input"))
    code = main(["--model", str(tmp_path / "models" / "src"), "--output-dir", str(tmp_path / "models"),
                 "--overwrite", "--device", "cpu"])
    assert code == 2 and "contains the model being pruned" in capsys.readouterr().err
    assert _tree(tmp_path / "models") == before


# ============================================================================= 2. nothing lost, nothing left
def _symlink_to_earlier_output(tmp_path, pruned):
    """An output folder reached through a link: written through to the link's target, on the target's disk."""
    model, pruner = pruned
    real = pruner.save(model, tmp_path / "disk2" / "ckpt", command="first")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    assert pruner.save(model, link, overwrite=True, command="second") == link
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert json.loads((real / CONFIG_NAME).read_text())["command"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk2", "link"]  # no `.link.tmp-*` left
    assert sorted(p.name for p in (tmp_path / "disk2").iterdir()) == ["ckpt"]


def _symlink_to_new_folder(tmp_path, pruned):
    model, pruner = pruned
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "disk2" / "ckpt", target_is_directory=True)  # dangling: the target is made
    pruner.save(model, link)
    assert link.is_symlink() and (tmp_path / "disk2" / "ckpt" / CONFIG_NAME).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk2", "link"]


KILLED_SAVE = """
    import os, signal, sys
    from pathlib import Path
    from tinymodels import make_tiny
    from optimum_d2prune import D2PruneConfig, save_pruned

    model = make_tiny("llama")
    write = type(model).save_pretrained

    def write_then_die(self, *args, **kwargs):
        write(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    type(model).save_pretrained = write_then_die
    save_pruned(model, Path(sys.argv[1]), D2PruneConfig(method="magnitude", sparsity=0.5), overwrite=True)
"""


def _killed_save_leftovers(tmp_path, pruned):
    """A save killed by SIGTERM leaves its temporary folder; the next save to that folder removes it, and only
    what this tool made (a look-alike user folder stays)."""
    model, pruner = pruned
    out = pruner.save(model, tmp_path / "ckpt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_SAVE), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -15, proc.stderr[-2000:]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt.tmp-")]
    assert len(leftovers) == 1, sorted(p.name for p in tmp_path.iterdir())
    decoy = tmp_path / ".ckpt.tmp-0123456789ab"
    decoy.mkdir()
    (decoy / "draft.txt").write_text("a user's folder that merely looks like one")
    pruner.save(model, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckpt.tmp-0123456789ab", "ckpt"]
    assert (decoy / "draft.txt").is_file()


def _two_runs_into_one_folder(tmp_path, pruned):
    """Run B replaced run A's folder: A's evaluation must not land next to B's weights."""
    model, pruner = pruned
    out = pruner.save(model, tmp_path / "ckpt", run_id="run-a")
    pruner.save(model, out, overwrite=True, run_id="run-b")
    before = _tree(out)
    record_evaluation = _io("record_evaluation")
    with pytest.raises(CheckpointError, match="another save"):
        record_evaluation(out, {"perplexity": {"pruned": 12.0}}, {"report.html": "A"}, run_id="run-a")
    assert _tree(out) == before
    record_evaluation(out, {"perplexity": {"pruned": 13.0}}, {"report.html": "B"}, run_id="run-b")
    record = json.loads((out / CONFIG_NAME).read_text())
    assert record["run_id"] == "run-b" and record["evaluation"] == {"perplexity": {"pruned": 13.0}}
    assert (out / "report.html").read_text() == "B"


def _save_before_prune(tmp_path, pruned):
    with pytest.raises(ModelStateError, match=r"prune\("):
        D2Pruner(D2PruneConfig(**MAGNITUDE)).save(make_tiny("llama"), tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


NOTHING_LOST = {
    "overwrite through a symlink": _symlink_to_earlier_output,
    "save through a dangling symlink": _symlink_to_new_folder,
    "leftovers of a killed save": _killed_save_leftovers,
    "two runs into one folder": _two_runs_into_one_folder,
    "D2Pruner.save before prune": _save_before_prune,
}


@pytest.mark.parametrize("case", list(NOTHING_LOST), ids=list(NOTHING_LOST))
def test_nothing_lost_nothing_left(case, tmp_path, pruned):
    NOTHING_LOST[case](tmp_path, pruned)


# ================================================================================ 3. records and loads refused
def _edit_record(change):
    def apply(out: Path) -> None:
        record = json.loads((out / CONFIG_NAME).read_text())
        change(record)
        (out / CONFIG_NAME).write_text(json.dumps(record))
    return apply


def _edit_weights(change):
    def apply(out: Path) -> None:
        weights = load_file(out / "model.safetensors")
        change(weights)
        save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return apply


def _edit_config(**values):
    def apply(out: Path) -> None:
        config = json.loads((out / "config.json").read_text())
        config.update(values)
        (out / "config.json").write_text(json.dumps(config))
    return apply


REFUSED = {
    # name: (damage the saved folder, fragment of the one-line refusal)
    "a tensor missing from the files": (
        _edit_weights(lambda w: w.pop("model.layers.1.mlp.down_proj.weight")), "does not load as saved"),
    "an unexpected tensor": (
        _edit_weights(lambda w: w.update({"model.layers.0.mlp.extra.weight": torch.ones(4, 4)})),
        "not in the model"),
    "config.json with more layers": (_edit_config(num_hidden_layers=6), "config.json describes a model"),
    "config.json with other shapes": (_edit_config(intermediate_size=256), "does not load as saved"),
    "an empty sparsity map": (_edit_record(lambda r: r.update(sparsity={})), "records no pruned module"),
    "NaN in the sparsity map": (
        _edit_record(lambda r: r["sparsity"].update({next(iter(r["sparsity"])): math.nan})), "not a number"),
    "a string in the sparsity map": (
        _edit_record(lambda r: r["sparsity"].update({next(iter(r["sparsity"])): "half"})), "not a number"),
    "a record that is not JSON": (lambda out: (out / CONFIG_NAME).write_text("{\"config\": "), "not JSON"),
    "a record that is a list": (lambda out: (out / CONFIG_NAME).write_text("[1, 2]"), "not an object"),
    "a config that is not an object": (_edit_record(lambda r: r.update(config="d2prune")), "`config` is not"),
    "a record from a newer release": (
        _edit_record(lambda r: r.update(format_version=99)), "written by a newer optimum-d2prune: upgrade"),
}


@pytest.mark.parametrize("case", list(REFUSED), ids=list(REFUSED))
def test_load_refuses_what_does_not_match(case, tmp_path, pruned):
    model, pruner = pruned
    out = pruner.save(model, tmp_path / "ckpt")
    damage, message = REFUSED[case]
    damage(out)
    with pytest.raises(CheckpointError, match=message) as err:
        load_pruned(out)
    assert str(out) in str(err.value)  # names the folder or its file


def _unknown_field(record):
    record["config"]["sparsity_schedule"] = "cubic"


def _unknown_method(record):
    record["config"]["method"] = "my-own-method"


TOLERATED = {
    # name: (record change, warning fragment, expected config: "same" or None)
    "a config field this version does not know": (_unknown_field, "sparsity_schedule", "same"),
    "a method registered only in the user's code": (_unknown_method, "my-own-method", None),
}


@pytest.mark.parametrize("case", list(TOLERATED), ids=list(TOLERATED))
def test_load_tolerates_newer_records_with_a_warning(case, tmp_path, pruned, caplog):
    model, pruner = pruned
    out = pruner.save(model, tmp_path / "ckpt")
    change, warning, expected = TOLERATED[case]
    _edit_record(change)(out)
    with caplog.at_level(logging.WARNING):
        loaded, config = load_pruned(out)
    assert any(warning in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert config == (pruner.config if expected == "same" else None)
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(loaded.state_dict()[name], model.state_dict()[name])  # the saved weights, verified


def _pickled_bin(root: Path, tokenizer_dir: Path) -> tuple[Path, str]:
    import shutil

    from transformers import AutoTokenizer

    folder = root / "binmodel"
    shutil.copytree(tokenizer_dir, folder)
    tiny_llama_for(AutoTokenizer.from_pretrained(tokenizer_dir)).config.save_pretrained(folder)

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled",))

    torch.save({"model.embed_tokens.weight": Payload()}, folder / "pytorch_model.bin")
    return folder, "pytorch_model.bin"


def _fake_gguf(root: Path, tokenizer_dir: Path) -> tuple[Path, str]:
    (root / "model.gguf").write_bytes(b"not a gguf model at all")
    return root / "model.gguf", "not a GGUF file"


MODEL_FILES = {"a pickled .bin model": _pickled_bin, "a fake .gguf file": _fake_gguf}


@pytest.mark.parametrize("case", list(MODEL_FILES), ids=list(MODEL_FILES))
def test_cli_names_an_unloadable_model_file(case, tmp_path, tokenizer_dir, capsys):
    from optimum_d2prune.commands import main

    model, message = MODEL_FILES[case](tmp_path, tokenizer_dir)
    code = main(["--model", str(model), "--output-dir", str(tmp_path / "out"), "--device", "cpu",
                 "--num-samples", "1", "--seq-len", "8", "--eval", "none"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(model) in lines[0] and message in lines[0], err
    assert "unpickled" not in capsys.readouterr().out


# ============================================================================ 4. resume only the same run
def _norm_changed(model):
    with torch.no_grad():
        model.model.norm.weight.add_(0.5)


def _bias_changed(model):
    with torch.no_grad():
        model.model.decoder.layers[0].self_attn.q_proj.bias.add_(0.5)


def _rope_changed(model):
    parameters = getattr(model.config, "rope_parameters", None)
    if isinstance(parameters, dict):
        model.config.rope_parameters = {**parameters, "rope_theta": 20000.0}
    else:
        model.config.rope_theta = 20000.0


RESUME = {
    # name: (tiny model, change applied to the second copy or None, refused)
    "a model differing in its norms": ("llama", _norm_changed, True),
    "a bias-only fine-tune": ("opt", _bias_changed, True),
    "a changed rope_theta in the config": ("llama", _rope_changed, True),
    "the identical model": ("llama", None, False),
}


@pytest.mark.parametrize("case", list(RESUME), ids=list(RESUME))
def test_resume_only_continues_the_same_run(case, tmp_path):
    name, change, refused = RESUME[case]
    ckpt = tmp_path / "ckpt"
    config = D2PruneConfig(method="wanda", sparsity=0.5, runtime={"checkpoint_dir": str(ckpt)})
    D2Pruner(config).prune(make_tiny(name), calib_batches(num=1))
    before = _tree(ckpt)
    other = make_tiny(name)
    if change is not None:
        change(other)
    pruner = D2Pruner(config)
    if refused:
        with pytest.raises(ValueError, match="holds a run with another model"):
            pruner.prune(other, calib_batches(num=1))
    else:
        pruner.prune(other, calib_batches(num=1))
        assert pruner.report.total_sparsity == pytest.approx(0.5, abs=1e-3)
    assert _tree(ckpt) == before


# ============================================================================= 5. model card and provenance
EVIL = '"><img src=x onerror=alert(1)>'
CARD_CASES = {
    # name: (record change, text that must be in the rendered text of the card)
    "a multi-line base_model inherited from a local card": (
        lambda r: r.update(base_model=f"org/m\n# Owned\n{EVIL}"), None),
    "HTML in a calibration file name": (lambda r: r.update(calibration={"source": f"c4{EVIL}.jsonl"}), EVIL),
    "a newline, a pipe and back-ticks in a metric name": (
        lambda r: r.update(evaluation={"ppl (a|b\n# x`.txt)": {"pruned": 1.0}}), "ppl (a|b # x`.txt)"),
    "back-ticks in the command": (lambda r: r.update(command="run ```\n# Injected\n```"), "run ```\n# Injected\n```"),
}


def _structure(card) -> tuple[list[str], list[int], list[str], str]:
    """(headings, cells per table row, raw HTML pieces, rendered text) of a card's Markdown body."""
    from markdown_it import MarkdownIt

    tokens = MarkdownIt("commonmark").enable("table").parse(str(card).split("\n---\n", 1)[1])
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    cells, row, html, text = [], 0, [], []
    for t in tokens:
        if t.type == "tr_open":
            row = 0
        elif t.type in ("td_open", "th_open"):
            row += 1
        elif t.type == "tr_close":
            cells.append(row)
        elif t.type == "html_block":
            html.append(t.content)
        for child in t.children or []:
            if child.type == "html_inline":
                html.append(child.content)
            elif child.type in ("text", "code_inline"):
                text.append(child.content)
            elif child.type == "softbreak":
                text.append(" ")
        if t.type == "fence":
            text.append(t.content)
    return headings, cells, html, "".join(text)


@pytest.mark.parametrize("case", list(CARD_CASES), ids=list(CARD_CASES))
def test_card_escapes_every_value(case, tmp_path, pruned):
    model, pruner = pruned
    out = pruner.save(model, tmp_path / "ckpt", evaluation={"ppl": {"dense": 1.0, "pruned": 2.0}})
    record = json.loads((out / CONFIG_NAME).read_text())
    make_model_card = _io("make_model_card")
    headings, _, _, _ = _structure(make_model_card(record))
    change, shown = CARD_CASES[case]
    change(record)
    card = make_model_card(record)
    got_headings, cells, html, text = _structure(card)
    assert got_headings[1:] == headings[1:] and got_headings[0] == "Model pruned with magnitude pruning"
    assert html == []  # no raw HTML reaches the page
    assert len(set(cells)) <= 1  # every table row has as many cells as the header
    if shown is not None:
        assert shown in text  # the value is shown as written, as text
    assert card.data.base_model is None or "\n" not in card.data.base_model


def test_card_states_evaluation_sizes_and_warns_on_small_zero_shot(tmp_path, pruned, caplog):
    model, pruner = pruned
    out = pruner.save(model, tmp_path / "ckpt", run_id="r1")
    sizes = {"perplexity (held-out self-generated text, 8 x 512 tokens)": {"windows": 8, "tokens": 4096},
             "rte (acc)": {"examples": 40}}
    evaluation = {"perplexity (held-out self-generated text, 8 x 512 tokens)": {"dense": 9.0, "pruned": 11.0},
                  "rte (acc)": {"pruned": 0.55}}
    with caplog.at_level(logging.WARNING):
        _io("record_evaluation")(out, evaluation, run_id="r1", sizes=sizes)
    card = (out / "README.md").read_text()
    assert "8 windows, 4,096 tokens" in card and "40 examples" in card
    assert "fewer than 100 examples" in card
    assert any("fewer than 100 examples" in r.getMessage() for r in caplog.records)


def test_card_states_gguf_provenance(tmp_path):
    from optimum_d2prune.models import SMOLLM2_HUB_ID, smollm2_gguf_path

    model = make_tiny("llama")
    model.config._name_or_path = str(smollm2_gguf_path().parent)  # as after loading the wheel's GGUF file
    D2Pruner(D2PruneConfig(**MAGNITUDE)).prune(model, calib_batches(num=1))
    out = save_pruned(model, tmp_path / "ckpt", D2PruneConfig(**MAGNITUDE), base_model=SMOLLM2_HUB_ID)
    card = (out / "README.md").read_text()
    assert "dequantized from a Q4\\_1 GGUF file" in card
    record = json.loads((out / CONFIG_NAME).read_text())
    assert record["source"] == {"gguf_file": smollm2_gguf_path().name, "gguf_quantization": "Q4_1"}


# ==================================================================================== 6. publishing checked
@pytest.fixture
def hub_api(monkeypatch):
    """The real `HfApi`, autospecced: `HfApi(...)` returns `hub_api`; nothing reaches the network."""
    import huggingface_hub
    from huggingface_hub import HfApi

    api = mock.create_autospec(HfApi, instance=True)
    api.whoami.return_value = {"name": "me", "orgs": [{"name": "lab", "roleInOrg": "write"},
                                                      {"name": "club", "roleInOrg": "read"}],
                               "auth": {"accessToken": {"role": "write"}}}
    factory = mock.create_autospec(HfApi, return_value=api)
    monkeypatch.setattr(huggingface_hub, "HfApi", factory)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_stored")
    monkeypatch.setattr(importlib.import_module("optimum_d2prune.io.hub"), "hub_offline_reason",
                        lambda timeout=3.0: None)
    api.factory = factory
    return api


def _http_401():
    from huggingface_hub.errors import HfHubHTTPError

    response = mock.Mock(status_code=401, headers={}, url="https://huggingface.co/api/whoami-v2")
    return HfHubHTTPError("401 Client Error: Unauthorized", response=response)


PUSH_ACCESS = {
    # name: (repo id, prepare(api, monkeypatch), refusal fragment or None, whoami called)
    "a malformed repo id": ("not a repo", lambda api, mp: None, "user/name", False),
    "no token": ("me/tiny", lambda api, mp: mp.setattr("huggingface_hub.get_token", lambda: None),
                 "no Hugging Face token", False),
    "the Hub unreachable": ("me/tiny", lambda api, mp: mp.setattr(
        "optimum_d2prune.io.hub.hub_offline_reason", lambda timeout=3.0: "HF_HUB_OFFLINE is set"),
        "not reachable", False),
    "an invalid token": ("me/tiny", lambda api, mp: setattr(api.whoami, "side_effect", _http_401()),
                         "invalid or expired", True),
    "a read-only token": ("me/tiny", lambda api, mp: api.whoami.return_value["auth"]["accessToken"].update(
        role="read"), "read-only", True),
    "another user's namespace": ("someone-else/tiny", lambda api, mp: None, "may not write to the namespace", True),
    "an organization with the read role": ("club/tiny", lambda api, mp: None, "read role", True),
    "the user's own namespace": ("me/tiny", lambda api, mp: None, None, True),
    "an organization with write access": ("lab/tiny", lambda api, mp: None, None, True),
}


@pytest.mark.parametrize("case", list(PUSH_ACCESS), ids=list(PUSH_ACCESS))
def test_check_push_access(case, hub_api, monkeypatch):
    repo_id, prepare, refusal, asked = PUSH_ACCESS[case]
    prepare(hub_api, monkeypatch)
    check_push_access = _io("check_push_access")
    if refusal is None:
        assert check_push_access(repo_id) == "me"
        hub_api.factory.assert_called_once_with(token="hf_stored")
    else:
        with pytest.raises((InputError, OutputPathError), match=refusal) as err:
            check_push_access(repo_id)
        assert "\n" not in str(err.value)
    assert hub_api.whoami.called is asked
    assert not hub_api.create_repo.called and not hub_api.upload_folder.called


def test_cli_checks_push_access_before_loading(tmp_path, hub_api, capsys, monkeypatch):
    import optimum_d2prune.models as models
    from optimum_d2prune.commands import main

    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("loaded a model despite bad input"))
    code = main(["--model", "some/model", "--output-dir", str(tmp_path / "out"), "--push-to-hub", "me/tiny"])
    assert code == 2 and "no Hugging Face token" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_failed_push_says_where_the_model_is_and_how_to_retry(tmp_path, pruned, hub_api):
    model, pruner = pruned
    out = pruner.save(model, tmp_path / "ckpt")
    hub_api.upload_folder.side_effect = ConnectionError("connection reset by peer")
    with pytest.raises(OutputPathError) as err:
        _io("push_to_hub")(out, "me/tiny", private=True)
    message = str(err.value)
    assert f"saved at {out}" in message and f"hf upload me/tiny {out} --private" in message
    assert "connection reset by peer" in message
    hub_api.create_repo.assert_called_once_with("me/tiny", private=True, exist_ok=True, repo_type="model")
