"""Mixture-of-experts on tiny random Qwen3-MoE and Mixtral configs (random weights: structure tests only).

The routers are set so that routing is uneven and one expert never receives a token: rows 1 and 3 of the router
are the negatives of rows 0 and 2, row 4 is zero, so each token always has two strictly positive logits from the
two pairs and expert 4 (logit 0) never makes the top 2.
"""

from __future__ import annotations

import pytest
import torch
from tinymodels import assert_nm_pattern, calib_batches

from optimum_d2prune import D2PruneConfig, D2Pruner
from optimum_d2prune.architectures import get_adapter
from optimum_d2prune.architectures.experts import expert_parameters
from optimum_d2prune.calibration import experts as expert_statistics
from optimum_d2prune.calibration.experts import ExpertStatisticsCollector
from optimum_d2prune.calibration.hooks import calibration_context
from optimum_d2prune.pipeline.engine import PruningEngine
from optimum_d2prune.testing.families import TEXT, VOCAB

EXPERTS = 5
UNUSED = 4


def make_moe(kind: str, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    if kind == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**{**TEXT, "head_dim": 16, "num_experts": EXPERTS,
                                                "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                                "decoder_sparse_step": 1, "mlp_only_layers": []})
    else:
        config = transformers.MixtralConfig(**{**TEXT, "num_local_experts": EXPERTS, "num_experts_per_tok": 2,
                                               "intermediate_size": 32})
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.gate.weight
            w[1], w[3], w[UNUSED] = -w[0], -w[2], 0.0
    return model


def expert_weights(model):
    out = {}
    for i, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        for param in ("gate_up_proj", "down_proj"):
            for e in range(EXPERTS):
                out[f"{i}.{param}[{e}]"] = getattr(experts, param)[e]
    return out


def router_counts(model, batches):
    """Tokens per expert of block 0, counted from the router's own output in a dense forward."""
    counts = torch.zeros(EXPERTS, dtype=torch.long)

    def hook(module, args, output):
        index = output[2]
        counts.add_(torch.bincount(index.reshape(-1), minlength=EXPERTS))

    handle = model.model.layers[0].mlp.gate.register_forward_hook(hook)
    with torch.no_grad():
        for ids in batches:
            model(ids, use_cache=False)
    handle.remove()
    return counts


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_expert_token_counts_match_the_router_and_every_expert_is_exact(kind):
    model = make_moe(kind)
    batches = calib_batches()
    expected = router_counts(model, batches)
    assert int(expected[UNUSED]) == 0 and int(expected.min()) == 0 and int(expected.max()) > int(expected[:4].min())
    pruner = D2Pruner(D2PruneConfig(sparsity=0.5, method_options={"skip_update": "dynamic"}))
    pruner.prune(model, batches)
    report = pruner.report
    block0 = {e.expert: e for e in report.experts if e.block == 0}
    assert {e: r.tokens for e, r in block0.items()} == {e: int(n) for e, n in enumerate(expected)}
    unused = block0[UNUSED]
    assert unused.fallback and unused.solver == "magnitude"
    assert not any(r.fallback for e, r in block0.items() if r.tokens >= 16)
    assert f"[{UNUSED}] (0 tokens, magnitude)" in report.summary()
    for name, w in expert_weights(model).items():
        assert int((w == 0).sum()) == w.numel() // 2, name
    assert {r.name.split(".experts.")[1] for r in report.layers if ".experts." in r.name} == {
        f"{p}[{e}]" for p in ("gate_up_proj", "down_proj") for e in range(EXPERTS)}
    assert not any("gate.weight" in r.name or r.name.endswith("mlp.gate") for r in report.layers)  # router dense
    assert torch.isfinite(model(torch.randint(0, VOCAB, (1, 8))).logits).all()


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_two_four_along_the_input_dimension_of_every_expert(method):
    model = make_moe("qwen3_moe")
    D2Pruner(D2PruneConfig(mask_structure="2:4", method=method)).prune(model, calib_batches())
    assert_nm_pattern(expert_weights(model))  # groups of 4 consecutive inputs (the last dim of [E, out, in])


def test_sparsity_zero_keeps_the_logits_and_save_reload_keeps_expert_zeros(tmp_path):
    import transformers

    model = make_moe("mixtral")
    ids = torch.randint(0, VOCAB, (2, 10))
    before = model(ids).logits
    D2Pruner(D2PruneConfig(sparsity=0.0)).prune(model, calib_batches())
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=1e-5)
    D2Pruner(D2PruneConfig(sparsity=0.5, method="wanda")).prune(model, calib_batches())
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for name, w in expert_weights(reloaded).items():
        assert int((w == 0).sum()) == w.numel() // 2, name


def test_expert_statistics_are_those_of_the_routed_tokens():
    """The Hessian of an expert's first matrix is built from exactly the tokens routed to it (checked against a
    replay from the router's output) and the down projection's from `act(gate) * up` of those tokens."""
    model = make_moe("qwen3_moe")
    mlp = model.model.layers[0].mlp
    seen = {}

    def keep_input(module, args):
        seen["x"] = args[0].reshape(-1, args[0].shape[-1])

    def keep_index(module, args, output):
        seen["index"] = output[2]

    h1 = mlp.register_forward_pre_hook(keep_input)
    h2 = mlp.gate.register_forward_hook(keep_index)
    collector = ExpertStatisticsCollector({"experts": mlp.experts}, "hessian", torch.device("cpu"), 24)
    with calibration_context(model):
        model(calib_batches(num=1)[0])
    collector.remove()
    h1.remove()
    h2.remove()
    x, index = seen["x"], seen["index"]
    for e in range(EXPERTS):
        rows = (index == e).any(-1)
        assert collector.tokens[("experts", e)] == int(rows.sum())
        if not rows.any():
            assert collector.statistics("experts", "gate_up_proj", e) is None
            continue
        xe = x[rows]
        torch.testing.assert_close(collector.statistics("experts", "gate_up_proj", e).inputs.gram(), xe.T @ xe)
        gate, up = (xe @ mlp.experts.gate_up_proj[e].T).chunk(2, -1)
        h = mlp.experts.act_fn(gate) * up
        torch.testing.assert_close(collector.statistics("experts", "down_proj", e).inputs.gram(), h.T @ h,
                                   rtol=1e-4, atol=1e-5)


def test_targets_can_leave_the_experts_dense():
    model = make_moe("qwen3_moe")
    D2Pruner(D2PruneConfig(sparsity=0.5, method="wanda", ignore=[r"experts"])).prune(model, calib_batches())
    assert all(int((w == 0).sum()) == 0 for w in expert_weights(model).values())
    engine = PruningEngine(D2PruneConfig(), get_adapter(model))
    names = [t.name for t in engine.plan(model).stacks[0].targets[0]]
    assert any(n.endswith("down_proj[4]") for n in names)


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "gpt-oss"])
def test_expert_replay_reproduces_the_experts_module(kind):
    """The per-expert replay used for statistics (first matrix, the module's own gating, down matrix; transposed
    and biased layouts included) recombines to exactly what the experts module computes."""
    from optimum_d2prune.testing.families import make_family

    model = make_family("gpt-oss") if kind == "gpt-oss" else make_moe(kind)
    experts = model.model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 64, generator=g)
    num = getattr(experts, expert_parameters(experts)[0]).shape[0]
    index = torch.stack([torch.randperm(num, generator=g)[:2] for _ in range(10)])
    weights = torch.rand(10, 2, generator=g)
    with torch.no_grad():
        expected = experts(hidden, index, weights)
        first, second = expert_parameters(experts)
        out = torch.zeros_like(hidden)
        for t in range(10):
            for k in range(2):
                e = int(index[t, k])
                h = expert_statistics._hidden_act(experts, first,
                                                  expert_statistics._linear(experts, first, e, hidden[t : t + 1]))
                out[t] += weights[t, k] * expert_statistics._linear(experts, second, e, h)[0]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_all_experts_allocated_up_front_give_the_same_statistics():
    """Data-parallel ranks allocate every expert's statistics (same keys everywhere); the sums are unchanged."""
    model = make_moe("qwen3_moe")
    experts = {"experts": model.model.layers[0].mlp.experts}
    lazy = ExpertStatisticsCollector(experts, "hessian", torch.device("cpu"), 24)
    eager = ExpertStatisticsCollector(experts, "hessian", torch.device("cpu"), 24, all_experts=True)
    with calibration_context(model):
        model(calib_batches(num=1)[0])
    lazy.remove()
    eager.remove()
    assert len(eager.stats) == 2 * EXPERTS and not lazy.stats  # deferred: nothing accumulated yet
    for e in range(EXPERTS):
        for param in ("gate_up_proj", "down_proj"):
            stat = lazy.statistics("experts", param, e)
            if e == UNUSED:  # no token: no statistics (deferred), zero sums (allocated up front)
                assert stat is None and eager.statistics("experts", param, e).inputs.num_tokens == 0
                continue
            torch.testing.assert_close(eager.statistics("experts", param, e).inputs.gram(), stat.inputs.gram())
            torch.testing.assert_close(eager.statistics("experts", param, e).y_sq, stat.y_sq)
    assert eager.token_counts(experts) == lazy.token_counts(experts) == lazy.tokens
    assert eager.token_counts(experts)[("experts", UNUSED)] == 0


def test_deferred_statistics_hold_one_expert_at_a_time_and_match_the_eager_ones(monkeypatch):
    """Without data parallelism an expert's Hessians are built when it is pruned, one expert at a time, from the
    kept inputs; the result is the same model as accumulating every expert's statistics during the forward."""
    alive = []
    original = ExpertStatisticsCollector.statistics

    def spy(self, name, param, expert):
        out = original(self, name, param, expert)
        alive.append(len({k.rsplit("[", 1)[1] for k in self._built}))  # experts with built statistics
        return out

    monkeypatch.setattr(ExpertStatisticsCollector, "statistics", spy)
    deferred = make_moe("mixtral")
    D2Pruner(D2PruneConfig(sparsity=0.5, method="sparsegpt")).prune(deferred, calib_batches())
    assert alive and max(alive) == 1

    eager = make_moe("mixtral")
    real_init = ExpertStatisticsCollector.__init__
    monkeypatch.setattr(ExpertStatisticsCollector, "__init__",
                        lambda self, *a, **k: real_init(self, *a, **{**k, "all_experts": True}))
    D2Pruner(D2PruneConfig(sparsity=0.5, method="sparsegpt")).prune(eager, calib_batches())
    for (name, a), b in zip(expert_weights(deferred).items(), expert_weights(eager).values()):
        torch.testing.assert_close(a, b, msg=name)


DIST_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {tests!r})
from tinymodels import calib_batches
from test_moe import make_moe
from optimum_d2prune import D2PruneConfig, D2Pruner

model = make_moe("qwen3_moe")
pruner = D2Pruner(D2PruneConfig(sparsity=0.5, method="sparsegpt"))
pruner.prune(model, calib_batches(num=6))
if int(os.environ.get("RANK", "0")) == 0:
    torch.save({{"state": model.state_dict(),
                "tokens": [(e.block, e.expert, e.tokens, e.solver) for e in pruner.report.experts]}}, sys.argv[1])
"""


def test_two_gloo_ranks_match_one_process_on_experts(tmp_path):
    """Data parallelism: every rank allocates every expert's statistics, they are all-reduced (an expert may get
    tokens on one rank only), and the token counts and the pruned experts equal a single process's."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "run.py"
    script.write_text(DIST_SCRIPT.format(tests=str(Path(__file__).resolve().parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = {"single": [sys.executable, str(script), str(tmp_path / "single.pt")],
            "multi": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                      "127.0.0.1", "--master_port", str(port), str(script), str(tmp_path / "multi.pt")]}
    for name, args in runs.items():
        result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, f"{name}: {result.stderr[-4000:]}"
    a, b = torch.load(tmp_path / "single.pt"), torch.load(tmp_path / "multi.pt")
    assert a["tokens"] == b["tokens"] and any(t[2] == 0 for t in a["tokens"])
    for key, value in a["state"].items():
        torch.testing.assert_close(b["state"][key], value, rtol=0, atol=1e-5, msg=key)


def test_experts_below_the_token_threshold_fall_back_to_wanda_and_are_reported():
    model = make_moe("qwen3_moe")
    pruner = D2Pruner(D2PruneConfig(sparsity=0.5, method="sparsegpt", method_options={"min_expert_tokens": 10**6}))
    pruner.prune(model, calib_batches())
    records = pruner.report.experts
    assert records and all(r.fallback for r in records)
    assert {r.solver for r in records if r.tokens} == {"wanda"}
    assert {r.solver for r in records if not r.tokens} == {"magnitude"}
    solvers = {r.name: r.solver for r in pruner.report.layers if ".experts." in r.name}
    assert set(solvers.values()) == {"wanda", "magnitude"}
    assert "(fallback)" in pruner.report.expert_table()
    for name, w in expert_weights(model).items():
        assert int((w == 0).sum()) == w.numel() // 2, name
    no_threshold = D2Pruner(D2PruneConfig(sparsity=0.5, method="sparsegpt", method_options={"min_expert_tokens": 0}))
    no_threshold.prune(make_moe("qwen3_moe"), calib_batches())  # an expert without tokens still gets magnitude
    assert {(r.tokens > 0, r.solver) for r in no_threshold.report.experts} == {(True, "sparsegpt"),
                                                                                (False, "magnitude")}
    with pytest.raises(ValueError, match="`min_expert_tokens` must be an integer >= 0"):
        D2PruneConfig(method_options={"min_expert_tokens": -1})


def test_resumed_run_keeps_the_expert_records(tmp_path):
    """The per-expert records (token counts, fallbacks) of finished blocks survive a resume from `checkpoint_dir`."""
    batches = calib_batches(num=2, batch=2, length=16)
    config = D2PruneConfig(method="sparsegpt", runtime={"checkpoint_dir": str(tmp_path / "ckpt")})
    first = D2Pruner(config)
    first.prune(make_moe("qwen3_moe"), batches)
    resumed = D2Pruner(config)  # same model, data and config: every block is restored from the checkpoint
    resumed.prune(make_moe("qwen3_moe"), batches)
    assert first.report.experts and resumed.report.experts == first.report.experts
