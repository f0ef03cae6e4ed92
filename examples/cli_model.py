"""LoRASubspaceMonitor configured from a LightningCLI YAML file.

A tiny random Llama (built from a config: no download) with peft LoRA on ``q_proj``/``v_proj``
learns next-token prediction on random tokens; everything, the monitor included, comes from
``examples/lightning_cli.yaml``. From the repository root:

    python examples/cli_model.py fit --config examples/lightning_cli.yaml
    .venv/bin/tensorboard --logdir runs

Override anything on the command line, e.g. ``--trainer.max_steps=100 --model.rank=16``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader, TensorDataset


class TinyLlamaLoRA(pl.LightningModule):
    """A random Llama (4 attention heads, 2 key/value heads) with peft LoRA, learning random tokens.

    The docstring is the command line's help (LightningCLI reads it): plain text, one line per
    argument.

    Args:
        hidden_size: the Llama's hidden size.
        num_layers: the Llama's number of layers.
        vocab_size: the Llama's vocabulary size.
        rank: the LoRA rank r.
        lora_alpha: the LoRA alpha (scaling alpha / r).
        target_modules: the projections LoRA adapts, as in peft's LoraConfig.
        lr: AdamW learning rate of the LoRA factors.
        samples: sequences of random tokens in the training set.
        seq_len: tokens per sequence.
        batch_size: sequences per batch.
    """

    def __init__(
        self,
        hidden_size: int = 32,
        num_layers: int = 2,
        vocab_size: int = 64,
        rank: int = 8,
        lora_alpha: float = 16.0,
        target_modules: Sequence[str] = ("q_proj", "v_proj"),
        lr: float = 1e-2,
        samples: int = 256,
        seq_len: int = 16,
        batch_size: int = 8,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # Imported here, not at the top: the command line's --help needs the signature only.
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM

        base = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=hidden_size,
                intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=vocab_size,
                max_position_embeddings=seq_len,
            )
        )
        config = LoraConfig(
            r=rank, lora_alpha=lora_alpha, target_modules=list(target_modules), lora_dropout=0.0
        )
        self.model = get_peft_model(base, config)

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        loss = self.model(input_ids=tokens, labels=tokens).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, hp.vocab_size, (hp.samples, hp.seq_len), generator=generator)
        return DataLoader(TensorDataset(tokens), batch_size=hp.batch_size, shuffle=True, generator=generator)


def main(args: Optional[list[str]] = None) -> LightningCLI:
    """Run ``LightningCLI`` on :class:`TinyLlamaLoRA` (``args`` default: ``sys.argv[1:]``)."""
    return LightningCLI(TinyLlamaLoRA, args=args)


if __name__ == "__main__":
    main()
