"""Vision transformers: transformers ViT/DeiT and timm ViT (fused qkv) adapters, image calibration, accuracy,
and the trained digits fixtures (real data; quality comparisons)."""

from __future__ import annotations

import copy

import pytest
import torch
from tinymodels import assert_nm_pattern, capture_attention

from optimum_d2prune import D2PruneConfig, D2Pruner
from optimum_d2prune.architectures import get_adapter
from optimum_d2prune.calibration.images import get_image_calibration_dataset, image_preprocessor
from optimum_d2prune.evaluation import image_accuracy
from optimum_d2prune.evaluation.image import class_logits
from optimum_d2prune.pipeline.engine import PruningEngine
from optimum_d2prune.testing import digits

IMAGE = 16
CLASSES = 6
#: top-1 tolerance of the D²Prune vs SparseGPT comparison on the digits fixtures, in test images (see that test)
TOLERANCE_IMAGES = 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: much faster for these tiny models on a shared 2-core machine, and deterministic."""
    with digits.torch_threads(1):
        yield


def tiny_transformers(kind: str, attn_implementation: str = "sdpa"):
    from transformers import (
        DeiTConfig,
        DeiTForImageClassification,
        DeiTForImageClassificationWithTeacher,
        ViTConfig,
        ViTForImageClassification,
    )

    kwargs = dict(image_size=IMAGE, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=64, num_labels=CLASSES)
    config_cls, model_cls = {
        "vit": (ViTConfig, ViTForImageClassification),
        "deit": (DeiTConfig, DeiTForImageClassification),
        "deit_teacher": (DeiTConfig, DeiTForImageClassificationWithTeacher),
    }[kind]
    config = config_cls(**kwargs)
    config._attn_implementation = attn_implementation
    return model_cls(config)


def tiny_timm(qk_norm: bool = False, distilled: bool = False):
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    model_cls = VisionTransformerDistilled if distilled else VisionTransformer
    return model_cls(img_size=IMAGE, patch_size=4, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2,
                     num_classes=CLASSES, qkv_bias=True, qk_norm=qk_norm)


TINY = ["vit", "deit", "deit_teacher", "timm", "timm_qk_norm", "timm_distilled"]


def make(name: str, seed: int = 0, attn_implementation: str = "sdpa"):
    torch.manual_seed(seed)
    if name.startswith("timm"):
        model = tiny_timm(qk_norm=name == "timm_qk_norm", distilled=name == "timm_distilled")
    else:
        model = tiny_transformers(name, attn_implementation)
    if name == "timm_qk_norm":  # non-trivial norm parameters, so that forgetting them would show
        for block in model.blocks:
            for norm in (block.attn.q_norm, block.attn.k_norm):
                norm.weight.data.uniform_(0.5, 1.5)
                norm.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def images(num: int = 3, batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, IMAGE, IMAGE, generator=g) for _ in range(num)]


def logits(model, x):
    with torch.no_grad():
        return class_logits(model(x))


def targets(model):
    engine = PruningEngine(D2PruneConfig(), get_adapter(model))
    return {t.name: t.weight() for t in engine.plan(model).targets()}


# ------------------------------------------------------------------------------------------- adapters, tiny
@pytest.mark.parametrize("name", TINY)
def test_adapter_and_targets(name):
    model = make(name)
    adapter = get_adapter(model)
    assert type(adapter).__name__ == ("TimmViTAdapter" if name.startswith("timm") else "GenericAdapter")
    names = sorted(targets(model))
    assert len(names) == 12  # per block: q, k, v (separate or row blocks of qkv), out projection, fc1, fc2
    if name.startswith("timm"):
        assert "blocks.0.attn.qkv[k]" in names and "blocks.1.attn.proj" in names


@pytest.mark.parametrize("name", TINY)
def test_sparsity_zero_reproduces_dense_logits(name):
    model = make(name)
    x = torch.randn(2, 3, IMAGE, IMAGE)
    before = logits(model, x)
    D2Pruner(D2PruneConfig(sparsity=0.0)).prune(model, images())
    torch.testing.assert_close(logits(model, x), before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["d2prune", "sparsegpt", "wanda", "magnitude"])
@pytest.mark.parametrize("name", ["deit_teacher", "timm"])
def test_unstructured_half_is_exact_on_every_target(name, method):
    model = make(name)
    pruner = D2Pruner(D2PruneConfig(sparsity=0.5, method=method))
    pruner.prune(model, images())
    weights = targets(model)
    for target, w in weights.items():
        assert int((w == 0).sum()) == w.numel() // 2, target
    assert {r.name for r in pruner.report.layers} == set(weights)
    assert torch.isfinite(logits(model, torch.randn(1, 3, IMAGE, IMAGE))).all()


@pytest.mark.parametrize("name", TINY)
def test_two_four_pattern_on_every_target(name):
    model = make(name)
    D2Pruner(D2PruneConfig(mask_structure="2:4")).prune(model, images())
    assert_nm_pattern(targets(model))


@pytest.mark.parametrize("choice", ["q", "k", "v"])
def test_fused_qkv_update_does_not_leak_into_the_unupdated_row_block(choice):
    """With `choice` left un-updated, its rows of the pruned fused qkv are exactly dense rows × mask, while the
    OBS-updated row blocks of the same Linear did move."""
    model = make("timm")
    dense = {i: b.attn.qkv.weight.detach().clone() for i, b in enumerate(model.blocks)}
    pruner = D2Pruner(D2PruneConfig(sparsity=0.5, method_options={"skip_update": choice}))
    pruner.prune(model, images())
    d = model.blocks[0].attn.num_heads * model.blocks[0].attn.head_dim
    rows = {p: slice(i * d, (i + 1) * d) for i, p in enumerate("qkv")}
    for i, block in enumerate(model.blocks):
        pruned = block.attn.qkv.weight.detach()
        for p, r in rows.items():
            kept = pruned[r] != 0
            assert int((~kept).sum()) == kept.numel() // 2
            masked_dense = dense[i][r] * kept
            if p == choice:
                assert torch.equal(pruned[r], masked_dense), f"block {i} {p}"
            else:
                assert not torch.allclose(pruned[r], masked_dense), f"block {i} {p} was not updated"
    unupdated = {r.name for r in pruner.report.layers if not r.updated}
    assert unupdated == {f"blocks.{i}.attn.qkv[{choice}]" for i in range(2)}


def _vit_with_timm_weights(timm_model):
    """A transformers ViT computing the same function as `timm_model` (separate q/k/v; every weight copied)."""
    vit = make("vit")
    with torch.no_grad():
        embeddings = vit.vit.embeddings
        pairs = [(timm_model.patch_embed.proj, embeddings.patch_embeddings.projection),
                 (timm_model.norm, vit.vit.layernorm), (timm_model.head, vit.classifier)]
        embeddings.cls_token.copy_(timm_model.cls_token)
        embeddings.position_embeddings.copy_(timm_model.pos_embed)
        vit.vit.layernorm.eps = timm_model.norm.eps
        for tb, vb in zip(timm_model.blocks, vit.vit.layers):
            d = tb.attn.num_heads * tb.attn.head_dim
            for i, proj in enumerate((vb.attention.q_proj, vb.attention.k_proj, vb.attention.v_proj)):
                proj.weight.copy_(tb.attn.qkv.weight[i * d:(i + 1) * d])
                proj.bias.copy_(tb.attn.qkv.bias[i * d:(i + 1) * d])
            pairs += [(tb.attn.proj, vb.attention.o_proj), (tb.mlp.fc1, vb.mlp.fc1), (tb.mlp.fc2, vb.mlp.fc2),
                      (tb.norm1, vb.layernorm_before), (tb.norm2, vb.layernorm_after)]
            vb.layernorm_before.eps = tb.norm1.eps
            vb.layernorm_after.eps = tb.norm2.eps
        for src, dst in pairs:
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
    return vit


def test_fused_row_blocks_are_pruned_like_separate_linears():
    """Splitting timm's qkv into three row blocks is exactly pruning three separate Linears: a transformers ViT
    holding the same weights (separate q/k/v) prunes, on the same images, to the same q/k/v, with the OBS solver
    for the updated projections and the mask-only one for the projection left un-updated."""
    timm_model = make("timm")
    vit = _vit_with_timm_weights(timm_model)
    calib = images()
    torch.testing.assert_close(logits(vit, calib[0]), logits(timm_model, calib[0]), rtol=1e-4, atol=1e-5)
    config = D2PruneConfig(sparsity=0.5, method_options={"skip_update": "k"})
    for model in (timm_model, vit):
        D2Pruner(config).prune(model, calib)
    for tb, vb in zip(timm_model.blocks, vit.vit.layers):
        d = tb.attn.num_heads * tb.attn.head_dim
        for i, proj in enumerate((vb.attention.q_proj, vb.attention.k_proj, vb.attention.v_proj)):
            torch.testing.assert_close(tb.attn.qkv.weight[i * d:(i + 1) * d], proj.weight, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(tb.mlp.fc2.weight, vb.mlp.fc2.weight, rtol=1e-4, atol=1e-6)


def test_dynamic_choice_reports_fused_row_blocks():
    model = make("timm")
    pruner = D2Pruner(D2PruneConfig(sparsity=0.5, method_options={"skip_update": "dynamic", "strategy": "layer"}))
    pruner.prune(model, images())
    assert [a.block for a in pruner.report.attention] == [0, 1]
    for record in pruner.report.attention:
        assert record.objectives[record.chosen] == min(record.objectives.values())
        unupdated = [r for r in pruner.report.layers if r.block == record.block and not r.updated]
        assert [r.name for r in unupdated] == [f"blocks.{record.block}.attn.qkv[{record.chosen}]"]
    assert pruner.report.sparsity_by_module()["blocks.0.attn.qkv"] == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["vit", "deit", "deit_teacher"])
def test_attention_probs_match_transformers_eager(name):
    model = make(name, attn_implementation="eager")
    adapter, block, attention, inputs, _, out = capture_attention(
        model, lambda: model(torch.randn(2, 3, IMAGE, IMAGE), output_attentions=True))
    refs = adapter.projections(block)
    dense = {p: block.get_submodule(refs[p].module).weight.float() for p in ("q", "k")}
    scores = adapter.attention_scores(attention, inputs, dense)
    probs = scores.probs(slice(0, scores.num_heads))
    tokens = (IMAGE // 4) ** 2 + (2 if name.startswith("deit") else 1)  # cls (+ distillation) token
    assert probs.shape == (2, 4, tokens, tokens)
    torch.testing.assert_close(probs, out.attentions[1].float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["timm", "timm_qk_norm"])
def test_attention_probs_match_timm(name):
    """Re-computation of timm's `Attention.forward` with the adapter's probabilities reproduces its output."""
    model = make(name)
    adapter, _, attention, inputs, output, _ = capture_attention(model, lambda: model(torch.randn(2, 3, IMAGE, IMAGE)))
    d = attention.num_heads * attention.head_dim
    weight = attention.qkv.weight
    scores = adapter.attention_scores(attention, inputs, {"q": weight[:d], "k": weight[d:2 * d]})
    probs = scores.probs(slice(0, scores.num_heads))
    x = inputs.hidden_states
    b, t, _ = x.shape
    v = attention.qkv(x)[..., 2 * d:].reshape(b, t, attention.num_heads, attention.head_dim).transpose(1, 2)
    with torch.no_grad():
        out = attention.proj((probs @ v).transpose(1, 2).reshape(b, t, d))
    torch.testing.assert_close(out, output, rtol=1e-4, atol=1e-5)
    # and the probabilities themselves, as timm's non-fused path computes them
    qkv = attention.qkv(x).reshape(b, t, 3, attention.num_heads, attention.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attention.q_norm(qkv[0]), attention.k_norm(qkv[1])
    expected = ((q * attention.scale) @ k.transpose(-2, -1)).softmax(-1)
    torch.testing.assert_close(probs, expected.detach(), rtol=1e-4, atol=1e-6)


def test_timm_attention_other_than_fused_qkv_is_refused():
    model = make("timm")
    model.blocks[1].attn.qkv = torch.nn.Identity()
    with pytest.raises(ValueError, match="fused `attn.qkv`"):
        get_adapter(model)


# ----------------------------------------------------------------------------------- calibration, accuracy
@pytest.fixture(scope="module")
def splits():
    return digits.load_digits_splits()


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory, splits):
    """60 real digit test images as 8-bit PNGs in one subfolder per class (6 classes used)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("digits_png")
    counts = {}
    for image, label in zip(splits.test_images, splits.test_labels):
        label = int(label)
        if label >= CLASSES or counts.get(label, 0) >= 10:
            continue
        counts[label] = counts.get(label, 0) + 1
        pixels = ((image[0] * 0.5 + 0.5).clamp(0, 1) * 255).round().byte().numpy()
        (root / f"class_{label}").mkdir(exist_ok=True)
        Image.fromarray(pixels).save(root / f"class_{label}" / f"{counts[label]:02d}.png")
    return root


def timm_digits_preprocess(model):
    model.pretrained_cfg = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3,
                            "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}
    return image_preprocessor(model)


def test_calibration_from_folder_with_timm_transform(digit_folder, splits):
    model = digits.build_digits_model("timm")
    preprocess = timm_digits_preprocess(model)
    batches = get_image_calibration_dataset(digit_folder, model, num_samples=24, batch_size=10, seed=1,
                                            with_labels=True)
    assert [b["pixel_values"].shape for b in batches] == [(10, 3, 32, 32), (10, 3, 32, 32), (4, 3, 32, 32)]
    again = get_image_calibration_dataset(digit_folder, preprocess, num_samples=24, batch_size=10, seed=1)
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(batches, again))
    labels = torch.cat([b["labels"] for b in batches])
    assert labels.min() >= 0 and labels.max() < CLASSES
    # the PNGs hold the fixture's own images (8-bit): the timm transform gives them back up to quantisation
    pixels = torch.cat([b["pixel_values"] for b in batches])
    distance = (pixels[:, None] - splits.test_images[None]).abs().amax(dim=(2, 3, 4))  # [24, 360]
    assert bool((distance.min(1).values <= 2 / 255 + 1e-6).all())
    other = get_image_calibration_dataset(digit_folder, preprocess, num_samples=24, batch_size=10, seed=2)
    assert not torch.equal(other[0]["pixel_values"], batches[0]["pixel_values"])


def test_calibration_from_folder_and_dataset_with_transformers_processor(digit_folder):
    from PIL import Image
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                  resample=Image.BILINEAR)
    folder = get_image_calibration_dataset(digit_folder, processor, num_samples=8, batch_size=8, seed=0)
    assert folder[0]["pixel_values"].shape == (8, 3, 32, 32)
    datasets = pytest.importorskip("datasets")
    files = sorted(digit_folder.rglob("*.png"))
    dataset = datasets.Dataset.from_dict(
        {"img": [str(f) for f in files], "label": [int(f.parent.name.split("_")[1]) for f in files]}
    ).cast_column("img", datasets.Image())
    batches = get_image_calibration_dataset(dataset, processor, num_samples=8, batch_size=4, with_labels=True)
    assert [b["pixel_values"].shape for b in batches] == [(4, 3, 32, 32)] * 2
    assert all(b["labels"].min() >= 0 for b in batches)
    # batches go straight into the pruner
    D2Pruner(D2PruneConfig(sparsity=0.5, method="wanda")).prune(
        digits.build_digits_model("deit", digits.DigitsRecipe(depth=1)), batches)


def test_transformers_model_preprocessing_from_its_saved_processor(tmp_path, digit_folder):
    from PIL import Image
    from transformers import DeiTForImageClassification, ViTImageProcessor

    digits.build_digits_model("deit", digits.DigitsRecipe(depth=1)).save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                      resample=Image.BILINEAR).save_pretrained(tmp_path)
    model = DeiTForImageClassification.from_pretrained(tmp_path).eval()
    batches = get_image_calibration_dataset(digit_folder, model, num_samples=4, batch_size=4)
    assert batches[0]["pixel_values"].shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="image processor"):
        image_preprocessor(digits.build_digits_model("deit", digits.DigitsRecipe(depth=1)))


def test_hub_id_offline_error_says_what_to_do(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match="local image folder"):
        get_image_calibration_dataset("someone/some-images", lambda image: torch.zeros(3, 4, 4))


def test_image_accuracy_top1_top5():
    class Fixed(torch.nn.Module):
        def __init__(self, scores, wrap):
            super().__init__()
            self.scores, self.wrap = scores, wrap
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            out = self.scores[x[:, 0, 0, 0].long()]
            return type("Out", (), {"logits": out})() if self.wrap else out

    scores = torch.tensor([[9.0, 8, 7, 6, 5, 4], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [1, 2, 3, 4, 5, 6]])
    x = torch.zeros(4, 3, 2, 2)
    x[:, 0, 0, 0] = torch.arange(4).float()
    labels = torch.tensor([0, 0, 4, 2])  # top-1 hit, miss (rank 6), top-5 hit (rank 5), top-5 hit (rank 4)
    for wrap in (True, False):
        loader = [(x[:2], labels[:2]), {"pixel_values": x[2:], "labels": labels[2:]}]
        result = image_accuracy(Fixed(scores, wrap), loader)
        assert (result.top1, result.top5, result.num_images) == (0.25, 0.75, 4)
    assert image_accuracy(Fixed(scores[:, :3], False), [(x, torch.zeros(4))]).top5 is None
    with pytest.raises(ValueError, match="labels"):
        image_accuracy(Fixed(scores, False), [x])


# --------------------------------------------------------------------------- trained digits fixtures (real data)
@pytest.fixture(scope="module", params=digits.KINDS)
def fixture(request, splits):
    return digits.digits_model(request.param, splits=splits)


def test_fixture_is_a_useful_classifier(fixture, splits):
    assert fixture.test_accuracy >= 0.93, fixture.test_accuracy  # measured: deit 94.7 %, timm 96.9 %
    assert image_accuracy(fixture.model, digits.eval_batches(splits)).top1 == pytest.approx(fixture.test_accuracy)


def test_d2prune_against_sparsegpt_and_wanda(fixture, splits):
    """D²Prune vs SparseGPT and Wanda at 50 % and 70 %: same calibration images, same dense weights; top-1 on the
    360 held-out test images, and the mean KL divergence of each pruned model's class distribution from the dense
    model's on the same images.

    Pruning is deterministic, but over five calibration draws the top-1 of SparseGPT and D²Prune moved by up to
    two test images (benchmarks/results/vision.md). Top-1 is asserted >= SparseGPT up to that run-to-run range,
    `TOLERANCE_IMAGES` = 2 of the 360 test images: on timm at 50 % SparseGPT is one image above the dense model and
    D²Prune one below it (two discordant images, both in SparseGPT's favour; a paired McNemar test gives p = 0.5).
    The KL to the dense model resolves such differences and is asserted strictly: D²Prune's was 3-5x lower than
    SparseGPT's in all four cases.
    """
    calib = digits.calibration_batches(splits)
    test = digits.eval_batches(splits)
    images = torch.cat([x for x, _ in test])
    labels = torch.cat([y for _, y in test])
    dense = copy.deepcopy(fixture.model.state_dict())

    def log_probs() -> torch.Tensor:
        with torch.no_grad():
            return class_logits(fixture.model(images)).float().log_softmax(-1)

    reference = log_probs()
    top1, kl = {}, {}
    runs = {"wanda": {"method": "wanda"}, "sparsegpt": {"method": "sparsegpt"}, "d2prune": {}}
    try:
        for sparsity in (0.5, 0.7):
            for name, kwargs in runs.items():
                fixture.model.load_state_dict(dense)
                D2Pruner(D2PruneConfig(sparsity=sparsity, **kwargs)).prune(fixture.model, calib)
                pruned = log_probs()
                top1[name, sparsity] = int((pruned.argmax(-1) == labels).sum())  # correct test images
                kl[name, sparsity] = float((reference.exp() * (reference - pruned)).sum(-1).mean())
    finally:
        fixture.model.load_state_dict(dense)
    table = {f"{m}@{s}": (round(100 * v / len(labels), 2), round(kl[m, s], 5)) for (m, s), v in top1.items()}
    for sparsity in (0.5, 0.7):
        assert top1["d2prune", sparsity] >= top1["wanda", sparsity], table
        assert top1["d2prune", sparsity] >= top1["sparsegpt", sparsity] - TOLERANCE_IMAGES, table
        assert kl["d2prune", sparsity] < kl["sparsegpt", sparsity], table


def test_global_search_on_images_scores_candidates_by_logit_kl(splits):
    """The vision default (`strategy="auto"` -> "global"): four candidates scored by the held-out KL to
    the dense model, the winner pruned again on all the calibration images (one batch here: split by samples)."""
    model = make("timm")
    calib = images(num=1, batch=16)
    pruner = D2Pruner(D2PruneConfig(sparsity=0.5))
    pruner.prune(model, calib)
    report = pruner.report
    assert set(report.global_search) == {"q", "k", "v", "none"} and report.global_metric == "logit KL"
    assert all(v >= 0 for v in report.global_search.values())
    best = min(report.global_search, key=report.global_search.get)
    again = make("timm")
    D2Pruner(D2PruneConfig(sparsity=0.5, method_options={"skip_update": best})).prune(again, calib)
    for b1, b2 in zip(model.blocks, again.blocks):
        torch.testing.assert_close(b1.attn.qkv.weight, b2.attn.qkv.weight)
        torch.testing.assert_close(b1.mlp.fc2.weight, b2.mlp.fc2.weight)
