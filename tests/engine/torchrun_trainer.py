"""Run by ``torchrun --nproc_per_node 2`` from ``test_distributed.py`` and ``test_deepspeed.py``:
a transformers ``Trainer`` with the monitor, two CPU processes (gloo), each recording which
modules it analyzed. Usage, with the repository's root on ``PYTHONPATH``:
``torchrun --nproc_per_node 2 torchrun_trainer.py OUTPUT_DIR [--zero3]``; ``--zero3`` trains
under DeepSpeed ZeRO stage 3 (the Trainer's ``deepspeed=`` config, ``use_cpu=True``).

It trains on four samples, split over the processes: every step's batch is all of them, so
``python torchrun_trainer.py OUTPUT_DIR`` (one process, unsharded) applies the same updates.
"""

import argparse
import os
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import Trainer

from lora_monitor import LoRASubspaceCallback
from tests.helpers.data import TokenDataset, minilm_tokenizer, trainer_arguments
from tests.helpers.distributed import RecordingEngine, without_deepspeed_ops
from tests.helpers.models import add_lora, tiny_llama

SAMPLES = 4
#: ZeRO-3 with the Trainer's own AdamW and schedule; "auto" values are the arguments'.
ZERO3 = {
    "zero_optimization": {"stage": 3},
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}


def main(output_dir: Path, zero3: bool) -> None:
    tokenizer = minilm_tokenizer()
    model = add_lora(
        tiny_llama(len(tokenizer)), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), seed=0
    )
    callback = LoRASubspaceCallback(every_n_steps=2, reference="first", basis="delta_w_left", strict=True)
    engine = RecordingEngine(options=callback.engine.options)
    engine.record_dir = output_dir
    callback.engine = engine
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    # A ddp_backend in one process has accelerate look for a process group that is not there.
    extra: dict = {"ddp_backend": "gloo"} if processes > 1 else {}
    if zero3:
        without_deepspeed_ops()
        extra["deepspeed"] = ZERO3
    args = trainer_arguments(
        output_dir, 4, per_device_train_batch_size=SAMPLES // processes, save_strategy="steps", save_steps=4, **extra
    )
    dataset = torch.utils.data.Subset(TokenDataset(tokenizer), range(SAMPLES))
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback]).train()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--zero3", action="store_true")
    arguments = parser.parse_args()
    main(arguments.output_dir, arguments.zero3)
