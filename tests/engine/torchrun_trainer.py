"""Run by ``torchrun --nproc_per_node 2`` from ``test_distributed.py``: a transformers
``Trainer`` with the monitor, two CPU processes (gloo), each recording which modules it
analyzed. Usage, with the repository's root on ``PYTHONPATH``:
``torchrun --nproc_per_node 2 torchrun_trainer.py OUTPUT_DIR``."""

import sys
from pathlib import Path

from peft import LoraConfig
from transformers import Trainer

from lora_monitor import LoRASubspaceCallback
from tests.helpers.data import TokenDataset, minilm_tokenizer, trainer_arguments
from tests.helpers.distributed import RecordingEngine
from tests.helpers.models import add_lora, tiny_llama


def main(output_dir: Path) -> None:
    tokenizer = minilm_tokenizer()
    model = add_lora(
        tiny_llama(len(tokenizer)), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), seed=0
    )
    callback = LoRASubspaceCallback(every_n_steps=2, reference="first", basis="delta_w_left", strict=True)
    engine = RecordingEngine(options=callback.engine.options)
    engine.record_dir = output_dir
    callback.engine = engine
    args = trainer_arguments(
        output_dir, 4, per_device_train_batch_size=2, save_strategy="steps", save_steps=4, ddp_backend="gloo"
    )
    Trainer(model=model, args=args, train_dataset=TokenDataset(tokenizer), callbacks=[callback]).train()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
