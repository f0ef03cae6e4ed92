"""Lightning's ``ModelParallelStrategy`` (FSDP2) with the monitor, for ``test_lightning_fsdp2.py``.

``torchrun --nproc_per_node 2 fsdp2_lightning.py OUT --shard`` trains a tiny Llama sharded by
``fully_shard`` in ``configure_model`` (data_parallel_size=2, gloo on CPU); without ``--shard``
it trains the same model on one CPU device, the reference. Every rank sees the same batches
(``use_distributed_sampler=False``). The monitor's warnings go to ``OUT/warnings_rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lora_monitor import AnalysisWarning, LoRASubspaceMonitor
from tests.engine.sharded_loop import VOCAB, build


class ShardedLlama(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = build("llama")

    def configure_model(self) -> None:
        if self.device_mesh is None:  # one device: nothing to shard
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        return self.model(input_ids=tokens, labels=tokens).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    def train_dataloader(self):
        tokens = torch.randint(0, VOCAB, (32, 8), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(tokens), batch_size=4)


def main(out: Path, shard: bool) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if shard else "auto"
    # The functional probe is not read under FSDP2 (its forward is collective): off in both runs,
    # so that the sharded run's tags are the unsharded one's.
    monitor = LoRASubspaceMonitor(every_n_steps=2, reference="first", functional_probe=False)
    warnings.simplefilter("always", AnalysisWarning)
    with warnings.catch_warnings(record=True) as caught:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2 if shard else 1,
            strategy=strategy,
            max_steps=6,
            logger=TensorBoardLogger(str(out), name="run", version=0),
            callbacks=[monitor],
            use_distributed_sampler=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            log_every_n_steps=1,
        )
        trainer.fit(ShardedLlama())
    messages = [str(w.message) for w in caught if issubclass(w.category, AnalysisWarning)]
    (out / f"warnings_rank{trainer.global_rank}.json").write_text(json.dumps(messages))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]), "--shard" in sys.argv)
