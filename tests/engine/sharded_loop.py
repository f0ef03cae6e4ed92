"""A plain training loop under FSDP2, FSDP (1) or DeepSpeed ZeRO-3, for ``test_sharded.py``.

``torchrun --nproc_per_node 2 sharded_loop.py OUT --shard fsdp2 ...`` shards a tiny model with
``fully_shard`` on each decoder layer and on the root (as Lightning's ``ModelParallelStrategy``,
accelerate's FSDP2 and torchtitan do) and trains it over gloo; ``--shard fsdp1`` wraps it in
``FullyShardedDataParallel`` instead (each decoder layer a unit; on CPU it needs
``device_id=cpu`` and, for LoRA's mixed ``requires_grad``, ``use_orig_params=True``);
``--shard zero3`` hands it to ``deepspeed.initialize`` with ZeRO stage 3 (DeepSpeed's CPU
accelerator, gloo) and monitors ``engine.module``;
``python sharded_loop.py OUT ...`` trains the same model in one process, unsharded: the
reference. Every rank sees the same
batches, so both runs apply the same updates. Two monitors watch each run: one against the
run's first snapshot, one against a saved adapter (``--adapter``).

    sharded_loop.py OUT [--shard fsdp2|fsdp1|zero3] [--arch llama|phi3] [--adapter DIR] [--steps N]
                  [--stop-at N] [--resume DIR]

``--stop-at N`` ends training after step N and saves the monitors' and the model's states
under OUT; ``--resume DIR`` builds the model with another LoRA initialization, loads DIR's
states and trains on from there. Warnings the monitors give are written to
``OUT/warnings_rank<r>.json``, the shapes of the DTensors (FSDP2) or ZeRO-3 parameters the
monitors gathered (outside forward and backward) to ``OUT/gathered_rank<r>.json``, what they
said on the console to ``OUT/info_rank<r>.json``, the modules each monitor's references hold
on this rank at the end (:func:`held`) to ``OUT/held_rank<r>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

VOCAB, EVERY = 64, 2


def build(arch: str = "llama", lora_seed: int = 0) -> torch.nn.Module:
    """A tiny random model with LoRA on its attention projections; base weights from seed 0,
    LoRA factors (B random, so that ΔW ≠ 0 from the start) from ``lora_seed``."""
    import transformers
    from peft import LoraConfig, get_peft_model

    # bitsandbytes' CPU 4-bit kernels quantize blocks of 64 inputs.
    hidden = 64 if arch == "llama4bit" else 48
    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2)
    common.update(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    if arch in ("llama", "llama4bit"):
        base_class, config, targets = (
            transformers.LlamaForCausalLM,
            transformers.LlamaConfig(**common),
            ["q_proj", "v_proj"],
        )
    else:  # Phi-3: q, k and v are row blocks of one fused qkv_proj
        base_class, config, targets = (
            transformers.Phi3ForCausalLM,
            transformers.Phi3Config(**common, pad_token_id=0, bos_token_id=1, eos_token_id=1),
            ["qkv_proj"],
        )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = base_class(config)
        if arch == "llama4bit":
            quantize_4bit(base, targets)
        torch.manual_seed(lora_seed)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.05)
    return model


def quantize_4bit(model: torch.nn.Module, targets: list[str]) -> None:
    """QLoRA's base: the targeted Linear layers replaced by bitsandbytes' nf4 ``Linear4bit``."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for name in targets:
            dense = getattr(layer.self_attn, name)
            quantized = bnb.nn.Linear4bit(
                dense.in_features, dense.out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4"
            )
            quantized.weight = bnb.nn.Params4bit(
                dense.weight.data.clone(), requires_grad=False, quant_type="nf4", module=quantized
            )
            setattr(layer.self_attn, name, quantized.to("cpu"))  # .to() quantizes


def shard(model: torch.nn.Module, how: str) -> torch.nn.Module:
    """The model to train: sharded in place by FSDP2, or wrapped by FSDP (1)."""
    layers = model.base_model.model.model.layers
    if how == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        policy = ModuleWrapPolicy({type(layers[0])})
        return FullyShardedDataParallel(
            model, device_id=torch.device("cpu"), use_orig_params=True, auto_wrap_policy=policy
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def zero3(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, gathered: list[list[int]]
) -> tuple[torch.nn.Module, Callable[[torch.Tensor], None]]:
    """``deepspeed.initialize`` with ZeRO stage 3 on the process group: the module to monitor
    (``engine.module``, its parameters partitioned) and a training step. The AdamW is handed to
    DeepSpeed as is (its update is elementwise: the unsharded run's, partition by partition).
    The shapes of the parameters ``deepspeed.zero.GatheredParameters`` is given from now on
    (the monitors' gathers) are recorded in ``gathered``."""
    import deepspeed

    from tests.helpers.distributed import without_deepspeed_ops

    without_deepspeed_ops()
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    gathered_parameters = deepspeed.zero.GatheredParameters

    def recording(parameters, *args, **kwargs):
        gathered.extend(list(p.ds_shape) for p in parameters)
        return gathered_parameters(parameters, *args, **kwargs)

    deepspeed.zero.GatheredParameters = recording

    def train_step(tokens: torch.Tensor) -> None:
        engine.backward(engine(input_ids=tokens, labels=tokens).loss)
        engine.step()

    return engine.module, train_step


def held(monitor) -> dict[str, list[list]]:
    """reference → the modules it holds on this rank: the factors before step 1, the run's
    first snapshot (a snapshot as captured) and the adapter read as the reference."""
    references = monitor.references
    first = references.first.factors if references.first is not None else None
    kinds = {"initial": references.initial_factors, "first": first, "adapter": references.saved}
    return {kind: sorted(map(list, factors)) for kind, factors in kinds.items() if factors is not None}


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(1000 + step))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--shard", choices=("fsdp2", "fsdp1", "zero3"))
    parser.add_argument("--arch", default="llama", choices=("llama", "phi3", "llama4bit"))
    parser.add_argument("--adapter", type=Path)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--stop-at", type=int)
    parser.add_argument("--resume", type=Path)
    args = parser.parse_args()

    from lora_monitor import AnalysisWarning, LoRAMonitor

    rank = 0
    if args.shard:
        torch.distributed.init_process_group("gloo")
        rank = torch.distributed.get_rank()
    model = build(args.arch, lora_seed=5 if args.resume else 0)
    gathered: list[list[int]] = []
    if args.shard in ("fsdp2", "fsdp1"):
        model = shard(model, args.shard)
        from torch.distributed.tensor import DTensor

        full_tensor = DTensor.full_tensor

        def recording_full_tensor(self, **kwargs):
            gathered.append(list(self.shape))
            return full_tensor(self, **kwargs)

        DTensor.full_tensor = recording_full_tensor
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def train_step(tokens: torch.Tensor) -> None:
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    if args.shard == "zero3":
        model, train_step = zero3(model, optimizer, gathered)
    start = 0
    if args.resume is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        saved = torch.load(args.resume / "train.pt", weights_only=False)
        options = StateDictOptions(full_state_dict=True)
        set_state_dict(
            model, optimizer, model_state_dict=saved["model"], optim_state_dict=saved["optimizer"], options=options
        )
        start = saved["step"]
    basis = "delta_w_left" if args.arch == "phi3" else "A"
    references = {"first": "first"} | ({"adapter": str(args.adapter)} if args.adapter else {})
    warnings.simplefilter("always", AnalysisWarning)
    with warnings.catch_warnings(record=True) as caught:
        monitors = {
            # A fused module's q, k and v share lora_A: compare them in ΔW's basis.
            name: LoRAMonitor(
                model, log_dir=args.out / f"tb_{name}", every_n_steps=EVERY, reference=reference, basis=basis
            )
            for name, reference in references.items()
        }
        if args.resume is not None:
            for name, monitor in monitors.items():
                monitor.load_state_dict(torch.load(args.resume / f"{name}_rank{rank}.pt", weights_only=True))
        stop = args.stop_at or args.steps
        for step in range(start + 1, stop + 1):
            train_step(batch(step))
            for monitor in monitors.values():
                monitor.step(step)
        if args.stop_at is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            for name, monitor in monitors.items():
                torch.save(monitor.state_dict(), args.out / f"{name}_rank{rank}.pt")
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
            if rank == 0:
                torch.save({"model": model_state, "optimizer": optim_state, "step": stop}, args.out / "train.pt")
        kept = {name: held(monitor) for name, monitor in monitors.items()}
        for monitor in monitors.values():
            monitor.close()
    (args.out / f"held_rank{rank}.json").write_text(json.dumps(kept))
    messages = [str(w.message) for w in caught if issubclass(w.category, AnalysisWarning)]
    (args.out / f"warnings_rank{rank}.json").write_text(json.dumps(messages))
    (args.out / f"gathered_rank{rank}.json").write_text(json.dumps(gathered))
    if args.shard:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
