"""The planted-rank teacher/student task of the end-to-end rank tests, ``benchmarks/rank_validation``'s
cases on a tiny random Llama: a teacher whose chosen matrices carry a planted low-rank update, and
a LoRA student trained by a plain loop to match its last hidden states (MSE on random tokens),
watched by ``LoRAMonitor(probe=...)`` as the README shows."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lora_monitor import LoRAMonitor
from tests.helpers.models import tiny_llama

HIDDEN, VOCAB = 64, 64

#: Where each of a Llama block's matrices lives.
_BLOCK_PART = {
    **dict.fromkeys(("q_proj", "k_proj", "v_proj", "o_proj"), "self_attn"),
    **dict.fromkeys(("gate_proj", "up_proj", "down_proj"), "mlp"),
}


def random_tokens(seed: int) -> torch.Tensor:
    """A batch of 16 random sequences of 16 tokens, fixed by ``seed``."""
    return torch.randint(0, VOCAB, (16, 16), generator=torch.Generator().manual_seed(100 + seed))


def last_hidden(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, output_hidden_states=True).hidden_states[-1]


def planted_teacher(planted: Mapping[str, int]) -> torch.nn.Module:
    """The base model with a planted update of ``planted[name]`` flat directions added to every
    layer's ``name`` matrix (random orthonormal U, V; each singular value twice a typical σ of the
    weight), drawn layer by layer in the order of ``planted``."""
    teacher = tiny_llama(hidden_size=HIDDEN, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in teacher.model.layers:
            for name, rank in planted.items():
                linear = getattr(getattr(layer, _BLOCK_PART[name]), name)
                n, m = linear.weight.shape
                U = torch.linalg.qr(torch.randn(n, rank, generator=generator))[0]
                V = torch.linalg.qr(torch.randn(m, rank, generator=generator))[0]
                linear.weight += 2 * float(linear.weight.norm()) / n**0.5 * U @ V.T
    return teacher.eval()


def train_student(
    student: torch.nn.Module, teacher: torch.nn.Module, steps: int, **options: Any
) -> tuple[LoRAMonitor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """``steps`` AdamW steps (lr 1e-2) of ``student`` towards ``teacher`` on 8 batches in turn,
    monitored by ``LoRAMonitor(student, probe=..., **options)`` whose probe is the MSE on a ninth;
    the monitor and the data, ``(tokens, teacher's hidden states)`` with the probe's first."""
    with torch.no_grad():
        data = [(batch, last_hidden(teacher, batch)) for batch in map(random_tokens, range(9))]
    probe_tokens, probe_target = data[0]
    monitor = LoRAMonitor(
        student,
        probe=lambda: torch.nn.functional.mse_loss(last_hidden(student, probe_tokens), probe_target),
        **options,
    )
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    with monitor:
        for step in range(1, steps + 1):
            batch, target = data[1 + step % 8]
            torch.nn.functional.mse_loss(last_hidden(student, batch), target).backward()
            optimizer.step()
            optimizer.zero_grad()
            monitor.step(step)
    return monitor, data
