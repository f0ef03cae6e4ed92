"""Real Lightning training of the tiny peft models of ``conftest``, and reading back event files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset


class CausalLMModule(pl.LightningModule):
    """Next-token training of a peft causal LM held as ``self.model``, on random tokens."""

    def __init__(self, model: torch.nn.Module, lr: float = 1e-2, vocab_size: int = 64) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.vocab_size = vocab_size

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        loss = self.model(input_ids=tokens, labels=tokens).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, self.vocab_size, (64, 16), generator=generator)
        return DataLoader(TensorDataset(tokens), batch_size=8, shuffle=False)


def make_trainer(
    root: Path,
    callbacks: Sequence[Callback],
    max_steps: int,
    logger: Optional[Logger | list[Logger] | bool] = None,
    **trainer_kwargs,
) -> pl.Trainer:
    """A quiet CPU ``Trainer`` logging to TensorBoard under ``root`` unless told otherwise."""
    if logger is None:
        logger = TensorBoardLogger(str(root), name="run", version=0)
    options = dict(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        default_root_dir=str(root),
    )
    options.update(trainer_kwargs)
    return pl.Trainer(**options)


def read_events(log_dir: str | Path) -> EventAccumulator:
    """All scalars and images of a TensorBoard log directory."""
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events
