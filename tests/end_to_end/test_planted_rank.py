"""The rank suggestion on tasks whose needed rank is known, small enough for every CI run: the
planted-rank teacher/student cases of ``benchmarks/rank_validation`` on a tiny random Llama.

The teacher is the base model with a planted rank-K update (K flat singular values, twice a
typical σ of the weight) added to every q and v weight; the student is the base model + LoRA,
trained to match the teacher's last hidden states (MSE) on random tokens, a plain loop with
``LoRAMonitor(probe=...)``. The benchmark supports: within [K, 2K] from a quarter of training on
(flat planted spectrum: k* = K); r below K: "r may be too small". Each case trains in seconds.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lora_monitor import LoRAMonitor
from lora_monitor.outputs.tags import SUGGESTED_TAG, WEAK_EVIDENCE_TAG
from tests.helpers.events import read_events, scalar_series
from tests.helpers.models import tiny_llama
from tests.helpers.teacher_student import HIDDEN, planted_teacher, train_student

STEPS = 120


def _train_student(planted: int, rank: int, seed: int, log_dir, **options: Any) -> LoRAMonitor:
    teacher = planted_teacher({"q_proj": planted, "v_proj": planted})
    torch.manual_seed(seed)
    student = get_peft_model(
        tiny_llama(hidden_size=HIDDEN, seed=0), LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "v_proj"])
    )
    monitor, _ = train_student(
        student, teacher, STEPS, log_dir=log_dir, every_n_steps=STEPS // 4, log_images=False, **options
    )
    return monitor


@pytest.mark.parametrize("planted, seed", [(2, 0), (2, 1), (4, 0), (4, 1)])
def test_the_suggestion_finds_a_planted_rank_from_a_quarter_of_training(planted, seed, tmp_path):
    monitor = _train_student(planted, rank=16, seed=seed, log_dir=tmp_path)
    suggested = scalar_series(read_events(tmp_path), SUGGESTED_TAG)
    assert sorted(suggested) == [30, 60, 90, 120]
    assert all(planted <= rank <= 2 * planted for rank in suggested.values()), suggested
    recommendation = monitor.recommendation
    assert recommendation.probe is not None and recommendation.probe.rank == planted
    assert not recommendation.weak and recommendation.low <= recommendation.rank <= recommendation.high


def test_a_rank_below_the_planted_one_is_said_to_be_too_small(tmp_path):
    monitor = _train_student(planted=8, rank=4, seed=0, log_dir=tmp_path)
    recommendation = monitor.recommendation
    assert recommendation.too_small and recommendation.rank == 4
    assert scalar_series(read_events(tmp_path), WEAK_EVIDENCE_TAG)[STEPS] == 1.0
