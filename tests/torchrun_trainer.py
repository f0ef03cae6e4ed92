"""Run by ``torchrun --nproc_per_node 2`` from ``test_transformers_distributed.py``: a transformers
``Trainer`` with the monitor, two CPU processes (gloo), each recording which modules it
analysed. Usage: ``torchrun --nproc_per_node 2 torchrun_trainer.py OUTPUT_DIR``."""

import json
import sys
from pathlib import Path

import torch
from hf_setup import TokenDataset, minilm_tokenizer, tiny_llama
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from lora_monitor import LoRASubspaceCallback
from lora_monitor.engine import LoRAMonitor


class RecordingEngine(LoRAMonitor):
    """Writes which modules this rank analysed at each step."""

    record: Path

    def _analyze(self, job):
        rank = torch.distributed.get_rank()
        with open(self.record / f"rank{rank}.jsonl", "a") as record:
            record.write(json.dumps([job.snapshot.step, sorted(job.snapshot.factors)]) + "\n")
        return super()._analyze(job)


def main(output_dir: Path) -> None:
    tokenizer = minilm_tokenizer()
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(len(tokenizer)), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    callback = LoRASubspaceCallback(every_n_steps=2, reference="first", basis="delta_w_left", strict=True)
    engine = RecordingEngine(options=callback.engine.options)
    engine.record = output_dir
    callback.engine = engine
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=["tensorboard"],
        save_strategy="steps",
        save_steps=4,
        use_cpu=True,
        disable_tqdm=True,
        ddp_backend="gloo",
    )
    Trainer(model=model, args=args, train_dataset=TokenDataset(tokenizer), callbacks=[callback]).train()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
