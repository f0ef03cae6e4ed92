"""Fixtures: the default tiny peft models of :mod:`tests.helpers.models`, and one saved."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.helpers.models import tiny_bert_lora, tiny_gpt2_lora, tiny_llama_lora

if TYPE_CHECKING:
    from peft import PeftModel


@pytest.fixture
def llama_lora() -> PeftModel:
    """``tiny_llama_lora()``: rank 8, LoRA on q_proj and v_proj, random B."""
    return tiny_llama_lora()


@pytest.fixture
def gpt2_lora() -> PeftModel:
    """``tiny_gpt2_lora()``: rank 8, LoRA on the fused c_attn, random B."""
    return tiny_gpt2_lora()


@pytest.fixture
def bert_lora() -> PeftModel:
    """``tiny_bert_lora()``: rank 8, LoRA on query and value, random B."""
    return tiny_bert_lora()


@pytest.fixture
def saved_llama_adapter(tmp_path: Path) -> tuple[PeftModel, Path]:
    """``(model, directory)``: ``tiny_llama_lora()`` and where ``save_pretrained`` wrote it."""
    model = tiny_llama_lora()
    directory = tmp_path / "llama_adapter"
    model.save_pretrained(str(directory))
    return model, directory
