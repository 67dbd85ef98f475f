"""Recovery distillation: it lowers the distance to the teacher, keeps zeros at zero when asked, and resumes."""

from __future__ import annotations

import copy

import pytest
import torch

from optimum_d2prune.errors import CheckpointError, ConfigError
from optimum_d2prune.structured import StructuredConfig, shrink, valid_ratios
from optimum_d2prune.structured.recovery import RecoveryConfig, _kl, distill
from optimum_d2prune.testing.families import VOCAB, make_family


def _batches(num: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, VOCAB, (2, 16), generator=g)} for _ in range(num)]


def _kl_to(student, teacher, batches) -> float:
    with torch.no_grad():
        return sum(float(_kl(student(**b).logits, teacher(**b).logits, None, 1.0)) for b in batches) / len(batches)


@pytest.mark.parametrize("mode", ["channels", "blocks"])
def test_distillation_brings_the_shrunk_model_closer_to_the_dense_one(mode):
    teacher = make_family("llama")
    student = copy.deepcopy(teacher)
    report = shrink(student, _batches(), StructuredConfig(mode=mode, ratio=valid_ratios(student, mode)[-1]))
    before = _kl_to(student, teacher, _batches())
    distill(student, teacher, _batches(), RecoveryConfig(steps=15, learning_rate=1e-4),
            layer_map=report.kept_blocks)
    assert _kl_to(student, teacher, _batches()) < 0.7 * before


@pytest.mark.parametrize("keep_masks", [True, False])
def test_keep_masks_keeps_every_zero(keep_masks):
    teacher = make_family("llama")
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in student.model.layers:
            for module in (layer.mlp.down_proj, layer.self_attn.q_proj):
                module.weight.mul_(torch.rand(module.weight.shape, generator=g) > 0.5)
    zeros = {n: (p == 0).clone() for n, p in student.named_parameters() if p.dim() == 2 and bool((p == 0).any())}
    distill(student, teacher, _batches(), RecoveryConfig(steps=3, learning_rate=1e-3, keep_masks=keep_masks))
    params = dict(student.named_parameters())
    still_zero = all(bool((params[n][m] == 0).all()) for n, m in zeros.items())
    assert still_zero is keep_masks


def test_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    teacher = make_family("llama")
    base = copy.deepcopy(teacher)
    shrink(base, _batches(), StructuredConfig(mode="channels", ratio=valid_ratios(base, "channels")[40]))
    straight, resumed = copy.deepcopy(base), copy.deepcopy(base)
    settings = dict(learning_rate=1e-3, save_every=2, output_dir=str(tmp_path / "state"))
    distill(straight, teacher, _batches(), RecoveryConfig(steps=6, learning_rate=1e-3))
    distill(resumed, teacher, _batches(), RecoveryConfig(steps=3, **settings))
    fresh = copy.deepcopy(base)  # a new process: the weights come from the saved state
    report = distill(fresh, teacher, _batches(), RecoveryConfig(steps=6, **settings))
    assert report.resumed_from == 3 and len(report.losses) == 6
    for (name, a), b in zip(straight.state_dict().items(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_a_state_of_another_run_is_refused(tmp_path):
    teacher = make_family("llama")
    student = copy.deepcopy(teacher)
    distill(student, teacher, _batches(), RecoveryConfig(steps=1, output_dir=str(tmp_path)))
    other = copy.deepcopy(teacher)
    shrink(other, _batches(), StructuredConfig(mode="channels", ratio=valid_ratios(other, "channels")[10]))
    with pytest.raises(CheckpointError, match="another recovery run"):
        distill(other, teacher, _batches(), RecoveryConfig(steps=2, output_dir=str(tmp_path)))


@pytest.mark.parametrize("settings,words", [(dict(steps=0), "steps"), (dict(learning_rate=0), "learning_rate"),
                                            (dict(kl_weight=0, hidden_weight=0), "nothing to train")])
def test_invalid_recovery_config_is_refused(settings, words):
    with pytest.raises(ConfigError, match=words):
        RecoveryConfig(**settings)


def test_a_student_with_fewer_blocks_needs_the_layer_map():
    teacher = make_family("llama")
    student = copy.deepcopy(teacher)
    shrink(student, _batches(), StructuredConfig(mode="blocks", ratio=0.5))
    with pytest.raises(ConfigError, match="kept_blocks"):
        distill(student, teacher, _batches(), RecoveryConfig(steps=1))
