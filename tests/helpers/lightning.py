"""Real Lightning training of the tiny peft models of :mod:`tests.helpers.models`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, TensorBoardLogger
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


class CountingModule(CausalLMModule):
    """Counts the training steps it ran (``steps_run``): an error at set-up must leave it at 0."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.steps_run = 0

    def training_step(self, batch, batch_idx):
        self.steps_run += 1
        return super().training_step(batch, batch_idx)


class AtStep(Callback):
    """Does something to the module at the end of given optimizer steps, before a monitor that
    comes after it in the callbacks list takes its snapshot."""

    def __init__(self, actions: dict[int, Callable[[pl.LightningModule], None]]) -> None:
        self.actions = actions

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        action = self.actions.get(trainer.global_step)
        if action is not None:
            action(pl_module)


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
