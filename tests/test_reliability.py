"""Fault cases, table-driven: bad input is refused before block 0, crashes and bad files never give a wrong model.

Every case uses real files or real processes (SIGKILL, `RLIMIT_FSIZE`); nothing under test is mocked. The README's
"Guarantees" section names the test behind each promise.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tinymodels import VOCAB, calib_batches, make_tiny

from optimum_d2prune import D2PruneConfig, D2Pruner
from optimum_d2prune.errors import D2PruneError
from optimum_d2prune.patterns import SparsityPattern

REPO = Path(__file__).resolve().parents[1]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before) -> None:
    after = model.state_dict()
    assert all(torch.equal(after[k], v) or torch.allclose(after[k], v, rtol=0, atol=0, equal_nan=True)
               for k, v in before.items() if not v.is_meta)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def run_child(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python with the tests folder and this checkout importable."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


# ------------------------------------------------------------------------------------- checkpoint_dir files
def _finished_checkpoint(tmp_path: Path, seed: int = 0) -> Path:
    ckpt = tmp_path / "ckpt"
    D2Pruner(D2PruneConfig(sparsity=0.5, method="sparsegpt", runtime={"checkpoint_dir": str(ckpt)})).prune(
        make_tiny("llama", seed=seed), calib_batches())
    return ckpt


class _RunsCode:
    """A pickle payload that creates a marker file when unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _crafted_state(ckpt: Path, tmp_path: Path) -> str:
    marker = tmp_path / "pwned"
    torch.save({"fingerprint": "x", "payload": _RunsCode(str(marker))}, ckpt / "state.pt")
    return str(marker)


def _state_without_digest(ckpt: Path, tmp_path: Path) -> None:
    """A state with the right fingerprint but no digest of its content (hand-edited, or another writer)."""
    state = torch.load(ckpt / "state.pt", weights_only=True)
    del state["digest"]
    state["hidden_states"] = [h * 0 for h in state["hidden_states"]]
    torch.save(state, ckpt / "state.pt")


def _truncated_state(ckpt: Path, tmp_path: Path) -> None:
    data = (ckpt / "state.pt").read_bytes()
    (ckpt / "state.pt").write_bytes(data[: len(data) // 2])


def _corrupted_state_tensor(ckpt: Path, tmp_path: Path) -> None:
    """Flip bytes inside the stored hidden states: the zip still loads, with wrong numbers."""
    data = bytearray((ckpt / "state.pt").read_bytes())
    start = data.find(b"data/0") + 200
    for i in range(start, start + 64):
        data[i] ^= 0x5A
    (ckpt / "state.pt").write_bytes(bytes(data))


def _corrupted_block(ckpt: Path, tmp_path: Path) -> None:
    path = ckpt / "block_0000.safetensors"
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 64, len(data)):  # inside the tensor data: still a valid safetensors file
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def _truncated_block(ckpt: Path, tmp_path: Path) -> None:
    path = ckpt / "block_0001.safetensors"
    path.write_bytes(path.read_bytes()[:100])


def _missing_block(ckpt: Path, tmp_path: Path) -> None:
    (ckpt / "block_0000.safetensors").unlink()


CHECKPOINT_FAULTS = {
    # name: (damage the finished checkpoint_dir, expected error)
    "crafted_state_runs_no_code": (_crafted_state, "unreadable or not a D²Prune state"),
    "truncated_state": (_truncated_state, "unreadable or not a D²Prune state"),
    "corrupted_state_tensor": (_corrupted_state_tensor, "is corrupted"),
    "state_without_digest": (_state_without_digest, "is corrupted"),
    "corrupted_block_file": (_corrupted_block, "corrupted or truncated"),
    "truncated_block_file": (_truncated_block, "corrupted or truncated"),
    "missing_block_file": (_missing_block, "block_0000.safetensors is missing"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_FAULTS))
def test_damaged_checkpoint_dir_is_refused_before_loading(case, tmp_path):
    damage, match = CHECKPOINT_FAULTS[case]
    ckpt = _finished_checkpoint(tmp_path)
    marker = damage(ckpt, tmp_path)
    model = make_tiny("llama")
    before = snapshot(model)
    with pytest.raises(D2PruneError, match=match):
        D2Pruner(D2PruneConfig(sparsity=0.5, method="sparsegpt", runtime={"checkpoint_dir": str(ckpt)})).prune(
            model, calib_batches())
    assert_untouched(model, before)
    if marker is not None:
        assert not Path(marker).exists(), "unpickling the state ran code"


def test_other_finetune_with_same_name_is_not_resumed(tmp_path):
    """Same architecture, same `_name_or_path`, same data and config, different weights: another run."""
    ckpt = _finished_checkpoint(tmp_path, seed=0)
    other = make_tiny("llama", seed=1)
    before = snapshot(other)
    with pytest.raises(D2PruneError, match="holds a run with another model"):
        D2Pruner(D2PruneConfig(sparsity=0.5, method="sparsegpt", runtime={"checkpoint_dir": str(ckpt)})).prune(
            other, calib_batches())
    assert_untouched(other, before)


# ------------------------------------------------------------------------------------- mask rules on bad shapes
def _stats_with_dead_inputs(weight: torch.Tensor, dead: list[int], seed: int = 0):
    from optimum_d2prune.calibration.statistics import InputStatistics, LinearStatistics

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, weight.shape[1], generator=g)
    x[:, dead] = 0
    inputs = InputStatistics(weight.shape[1], "hessian", torch.device("cpu"))
    stats = LinearStatistics(inputs, 64)
    inputs.add(x)
    stats.add_output(x @ weight.t())
    return stats


@pytest.mark.parametrize("lambdas", [(0.0, 0.0), (1.0, 0.0)])
@pytest.mark.parametrize("structure,expected", [("unstructured", 102), ("2:4", 512)])
def test_dead_inputs_stay_inside_the_exact_count(structure, expected, lambdas):
    """10 % of an 8x128 matrix is round(102.4) = 102 zeros, even with 40 of its 128 inputs never active."""
    from optimum_d2prune.methods.solvers import DualTaylor, OBSSolver

    g = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 128, generator=g)
    stats = _stats_with_dead_inputs(weight, dead=list(range(40)))  # whole N:M groups dead
    out = OBSSolver(dual_taylor=DualTaylor(*lambdas)).prune(weight, stats, SparsityPattern.parse(structure, 0.1))
    assert int((out.weight == 0).sum()) == expected
    assert torch.equal(out.weight == 0, out.mask)
    if structure == "2:4":
        assert bool(((out.weight == 0).reshape(8, 32, 4).sum(-1) == 2).all())


NM_BLOCK_SIZE_CASES = {
    # name: (config kwargs, expected error); each refused by the config, before any model is touched
    "m_does_not_divide_block_size": ({"mask_structure": "2:6"}, r"`block_size` \(128\) is not a multiple of M=6"),
    "m_above_block_size": ({"mask_structure": "2:256"}, r"not a multiple of M=256"),
    "m_does_not_divide_custom_block_size": ({"mask_structure": "2:4", "method": "sparsegpt",
                                             "method_options": {"block_size": 90}}, r"e\.g\. 88"),
}


@pytest.mark.parametrize("case", sorted(NM_BLOCK_SIZE_CASES))
def test_nm_groups_must_tile_the_solver_blocks(case):
    kwargs, match = NM_BLOCK_SIZE_CASES[case]
    with pytest.raises(D2PruneError, match=match):
        D2PruneConfig(**kwargs)


def test_nm_with_a_matching_block_size_prunes():
    from optimum_d2prune.methods.solvers import OBSSolver

    config = D2PruneConfig(mask_structure="2:6", method="sparsegpt", method_options={"block_size": 120})
    weight = torch.randn(6, 240)
    out = OBSSolver(block_size=config.method_options.block_size).prune(weight, _stats_with_dead_inputs(weight, []),
                                                                       config.pattern)
    assert bool(((out.weight == 0).reshape(6, 40, 6).sum(-1) == 2).all())


# ------------------------------------------------------------------------------------- refused before block 0
def _pad_model(model):
    model.config.pad_token_id = 0
    return model


def _meta_llama(model):
    from tinymodels import tiny_llama

    with torch.device("meta"):
        return tiny_llama()


BEFORE_BLOCK_0 = {
    # name: (config kwargs, calibration loader, model transform, expected error)
    "all_padding_ids": ({}, [torch.zeros(2, 16, dtype=torch.long)], _pad_model, "is padding"),
    "all_padding_mask": ({}, [{"input_ids": torch.ones(2, 16, dtype=torch.long),
                               "attention_mask": torch.zeros(2, 16, dtype=torch.long)}], None,
                         "fewer than 2 attended tokens"),
    "ids_above_vocabulary": ({}, [torch.full((2, 16), VOCAB + 5)], None, "outside the vocabulary"),
    "negative_ids": ({}, [torch.full((2, 16), -1)], None, "outside the vocabulary"),
    "longer_than_max_positions": ({}, [torch.randint(0, VOCAB, (1, 200))], None, "max_position_embeddings"),
    "model_on_meta_device": ({}, calib_batches(num=1), _meta_llama, "`meta` device"),
    "no_target_matches": ({"targets": ["nonexistent"]}, calib_batches(num=1), None, "No Linear layer matches"),
    "one_target_pattern_matches_nothing": ({"targets": ["q_proj", "qproj_typo"]}, calib_batches(num=1), None,
                                           "'qproj_typo' matches no Linear"),
    "nan_weight_before_block_0": ({}, calib_batches(num=1), lambda m: _poison(m, "model.layers.1.mlp.up_proj"),
                                  r"model\.layers\.1\.mlp\.up_proj\.weight"),
    "inf_in_norm_weight": ({"runtime": {"on_nonfinite": "skip"}}, calib_batches(num=1),
                           lambda m: _poison(m, "model.layers.0.input_layernorm", float("inf")),
                           r"model\.layers\.0\.input_layernorm\.weight"),
}


def _poison(model, module: str, value: float = float("nan")):
    with torch.no_grad():
        model.get_submodule(module).weight.view(-1)[3] = value
    return model


@pytest.mark.parametrize("case", sorted(BEFORE_BLOCK_0))
def test_bad_input_is_refused_before_block_0(case):
    kwargs, loader, transform, match = BEFORE_BLOCK_0[case]
    model = make_tiny("llama")
    model = transform(model) if transform else model
    before = snapshot(model)
    pruner = D2Pruner(D2PruneConfig(sparsity=0.5, **kwargs))
    with pytest.raises(D2PruneError, match=match):
        pruner.prune(model, loader)
    assert pruner.report is None  # no block was pruned, no report exists
    assert_untouched(model, before)


# ------------------------------------------------------------------------------------- non-finite values
def test_nan_weight_mid_model_names_block_and_module():
    """The refusal names the weight, not a Hessian that is not positive definite."""
    model = _poison(make_tiny("llama"), "model.layers.1.self_attn.k_proj")
    with pytest.raises(D2PruneError, match=r"NaN or Inf.*model\.layers\.1\.self_attn\.k_proj\.weight"):
        D2Pruner(D2PruneConfig(sparsity=0.5)).prune(model, calib_batches(num=1))


def test_nonfinite_activations_raise_at_the_block_they_enter():
    """An Inf produced inside block 0 (not in any weight) is caught entering block 1, not as a Hessian error."""
    model = make_tiny("llama")
    block = model.model.layers[0]
    hook = block.mlp.register_forward_hook(lambda m, a, out: out * float("inf"))
    try:
        with pytest.raises(D2PruneError, match="hidden states entering block 1 hold NaN or Inf"):
            D2Pruner(D2PruneConfig(sparsity=0.5, method="sparsegpt")).prune(model, calib_batches(num=1))
    finally:
        hook.remove()


def test_skip_leaves_the_module_reports_it_and_refuses_to_save(tmp_path):
    model = _poison(make_tiny("llama"), "model.layers.1.mlp.down_proj")
    pruner = D2Pruner(D2PruneConfig(sparsity=0.5, method="sparsegpt", runtime={"on_nonfinite": "skip"}))
    pruner.prune(model, calib_batches(num=1))
    assert list(pruner.report.skipped) == ["model.layers.1.mlp.down_proj"]
    assert "left unpruned (NaN/Inf): model.layers.1.mlp.down_proj" in pruner.report.summary()
    assert "model.layers.1.mlp.down_proj" not in {r.name for r in pruner.report.layers}
    assert len(pruner.report.layers) == 2 * 7 - 1
    with pytest.raises(ValueError, match=r"NaN or Inf .*model\.layers\.1\.mlp\.down_proj\.weight.*not saved"):
        pruner.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- inputs of every kind
def test_half_precision_timm_vit_gets_pixels_in_its_dtype():
    """Float32 image batches on a bf16 timm ViT are cast to the model's dtype before block 0."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=8, num_classes=4, embed_dim=32, depth=2, num_heads=2,
                              mlp_ratio=2, qkv_bias=True).to(torch.bfloat16).eval()
    pixels = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    pruner = D2Pruner(D2PruneConfig(sparsity=0.5, method="sparsegpt"))
    pruner.prune(model, pixels)
    assert model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert abs(pruner.report.total_sparsity - 0.5) < 1e-6


MASK_SHAPE_CASES = {
    "statistics_token_mask": "statistics",
    "attention_kl_query_mask": "attention",
}


@pytest.mark.parametrize("case", sorted(MASK_SHAPE_CASES))
def test_token_mask_of_the_wrong_shape_raises(case):
    """A mask that does not fit the tokens is refused (ignoring it would count padding as data)."""
    if MASK_SHAPE_CASES[case] == "statistics":
        from optimum_d2prune.calibration.hooks import StatisticsCollector

        layer = torch.nn.Linear(8, 4)
        collector = StatisticsCollector({"fc": layer}, "hessian", torch.device("cpu"), seq_len=6)
        collector.token_mask = torch.ones(2, 5, dtype=torch.bool)  # inputs are [2, 6, 8]
        try:
            with pytest.raises(ValueError, match="token mask has 10 entries but the layer input has 12 tokens"):
                layer(torch.randn(2, 6, 8))
        finally:
            collector.remove()
    else:
        from optimum_d2prune.methods.d2prune.attention import attention_kl

        p = torch.softmax(torch.randn(2, 3, 6, 6), -1)
        with pytest.raises(ValueError, match=r"`query_mask` \(2, 5\) does not match"):
            attention_kl(p, p.log(), torch.ones(2, 5, dtype=torch.bool))


def test_only_unreachable_hub_errors_become_offline(monkeypatch):
    """A bug (here a bad split name) surfaces as itself, not as 'offline: pass a local folder'."""
    datasets = pytest.importorskip("datasets")
    from optimum_d2prune.calibration.images import get_image_calibration_dataset

    def bad_split(*args, **kwargs):
        raise ValueError('Unknown split "tran". Should be one of ["train"].')

    monkeypatch.setattr(datasets, "load_dataset", bad_split)
    with pytest.raises(ValueError, match="Unknown split"):
        get_image_calibration_dataset("someone/some-images", lambda image: torch.zeros(3, 4, 4))


def test_digits_model_leaves_the_global_rng_alone():
    from optimum_d2prune.testing.digits import DigitsRecipe, build_digits_model

    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    build_digits_model("deit", DigitsRecipe(hidden_size=16, depth=1, heads=2))
    assert torch.equal(torch.rand(3), expected)


def test_process_group_initialised_for_a_run_is_destroyed(tmp_path):
    """Two real gloo ranks (torchrun's environment variables): after `prune` no process group is left."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = """
        import torch.distributed as dist
        from tinymodels import calib_batches, make_tiny
        from optimum_d2prune import D2PruneConfig, D2Pruner
        D2Pruner(D2PruneConfig(sparsity=0.5, method="magnitude")).prune(make_tiny("llama"), calib_batches(num=2))
        print("initialized-after-prune:", dist.is_initialized())
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env={**env, "RANK": str(r),
                                                                                "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
        assert "initialized-after-prune: False" in out


# ------------------------------------------------------------------------------------- crashes during save
SAVE_CHILD = """
    import hashlib, json, os, resource, shutil, signal, sys
    from pathlib import Path
    import torch
    from tinymodels import make_tiny
    from optimum_d2prune import D2PruneConfig
    from optimum_d2prune.io import save_pruned

    out, mode = Path(sys.argv[1]), sys.argv[2]
    config = D2PruneConfig(sparsity=0.5, method="magnitude")
    a, b = make_tiny("llama", seed=0), make_tiny("llama", seed=1)

    def content(folder):
        return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    save_pruned(a, out / "ref_a", config, run_id="a")  # fixed run ids: a save's files are then byte-identical
    save_pruned(b, out / "ref_b", config, run_id="b")
    refs = {"a": content(out / "ref_a"), "b": content(out / "ref_b")}
    target = out / "model"

    def state():
        if not target.exists():
            return "missing"
        found = content(target)
        return next((name for name, ref in refs.items() if ref == found), "mixed")

    # mutating filesystem steps of a save, seen through Python's audit hooks (no code under test is replaced)
    EVENTS = {"os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "ctypes.call_function"}

    def mutating(event, args):
        if event == "open":
            mode_, flags = args[1], args[2]
            return (isinstance(mode_, str) and any(c in mode_ for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR))
        return event in EVENTS

    results = []
    if mode == "kill-fallback":  # a filesystem without RENAME_EXCHANGE: the two-rename path
        import optimum_d2prune.io.atomic as atomic
        atomic.exchange = lambda a, b: False
    if mode.startswith("kill"):
        for k in range(1, 400):
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(out / "ref_a", target)
            pid = os.fork()
            if pid == 0:
                count = [0]
                def hook(event, args):
                    if mutating(event, args):
                        count[0] += 1
                        if count[0] == k:
                            os.kill(os.getpid(), signal.SIGKILL)
                sys.addaudithook(hook)
                save_pruned(b, target, config, overwrite=True, run_id="b")
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            right_after = state()
            from optimum_d2prune.io.atomic import clean_leftovers, recover_interrupted_swap
            recover_interrupted_swap(target)  # what the next save to `target` does first
            clean_leftovers(target)
            left = sorted(p.name for p in out.iterdir() if p.name.startswith(".model."))
            results.append([k, killed, right_after, state(), left])
            if not killed:
                break
    else:  # "full": the disk fills up (file size limit) in the middle of writing the weights
        shutil.copytree(out / "ref_a", target)
        before = {k: v.clone() for k, v in b.state_dict().items()}
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
        try:
            save_pruned(b, target, config, overwrite=True, run_id="b")
            results.append("saved")
        except OSError as err:
            results.append(str(err))
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
        unchanged = all(torch.equal(v, b.state_dict()[k]) for k, v in before.items())
        results += [state(), leftovers, unchanged]
    print("RESULT " + json.dumps(results))
"""


def _save_child(tmp_path: Path, mode: str):
    result = run_child(SAVE_CHILD, str(tmp_path), mode, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("RESULT "))
    import json

    return json.loads(line[len("RESULT "):])


def test_sigkill_at_every_step_of_save_leaves_old_or_new_folder(tmp_path):
    """`save(overwrite=True)` killed after its k-th filesystem step, for every k until it completes."""
    results = _save_child(tmp_path, "kill")
    assert results[-1][1] is False and results[-1][2] == "b", results[-1]  # ran to the end: all steps were tried
    assert len(results) > 3
    bad = [r for r in results if r[2] not in ("a", "b")]
    assert not bad, f"killed saves left neither the old nor the new folder: {bad}"
    assert [r for r in results if r[4]] == []  # the next save removes whatever a killed one left beside it
    assert {r[2] for r in results} == {"a", "b"}  # the kill points span the switch from old to new


def test_sigkill_without_atomic_exchange_is_repaired_by_the_next_save(tmp_path):
    """Where the filesystem cannot swap two folders, a kill between the two renames leaves the old folder aside;
    the next save to that folder puts it back before doing anything else."""
    results = _save_child(tmp_path, "kill-fallback")
    assert results[-1][1] is False and results[-1][3] == "b", results[-1]
    assert all(r[2] in ("a", "b", "missing") for r in results), results
    assert any(r[2] == "missing" for r in results)  # the kill between the two renames was hit
    bad = [r for r in results if r[3] not in ("a", "b")]
    assert not bad, f"not repaired: {bad}"
    assert [r for r in results if r[4]] == []


def test_full_disk_during_save_names_the_folder_and_keeps_the_old_one(tmp_path):
    message, state, leftovers, unchanged = _save_child(tmp_path, "full")
    assert message != "saved"
    assert str(tmp_path / "model") in message and "free space" in message
    assert state == "a"  # the folder being overwritten (here: the source model's own folder) is intact
    assert leftovers == []  # no temporary folder left behind
    assert unchanged  # the model in memory is untouched
