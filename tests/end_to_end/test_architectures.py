"""Every logged ΔW number is of the update the model applies, for each peft variant and each
architecture: real peft models trained by a real Lightning ``Trainer`` with
``LoRASubspaceMonitor()`` at its defaults, the TensorBoard scalars read back and compared with
merged minus pretrained weights (a deep copy, ``merge_and_unload``), fused modules cut by the
rows their architecture's attention uses (found by probing it, ``tests.helpers.architectures``).

The matrix: decoders (Llama, Mistral, Qwen2, Gemma, Gemma 2, OPT and the nine fused layouts of
GPT-2, GPT-BigCode, Phi-3, Falcon, GPT-NeoX, BLOOM), encoder-decoders (T5, BART, Whisper: q and
v of the encoder, the decoder and its cross-attention), encoders with a classification head kept
trainable by peft (BERT, RoBERTa, DistilBERT; ViT with ``modules_to_save``); the variants rsLoRA,
DoRA, PiSSA, OLoRA, AdaLoRA, QLoRA 4/8-bit; all-linear targets, ``layers_to_transform`` and two
adapters. About 75 s in all on two shared CPU cores."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Collection
from typing import Optional

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lora_monitor import LoRASubspaceMonitor
from lora_monitor.adapters.factors import PEFT_PREFIX
from lora_monitor.outputs.tags import scalar_tag
from tests.helpers.architectures import (
    FUSED,
    MORE,
    SEPARATE,
    Architecture,
    base_model,
    peft_model,
    probe_fused_rows,
    quantized_llama,
    training_samples,
)
from tests.helpers.events import read_events
from tests.helpers.lightning import make_trainer
from tests.helpers.models import randomize_lora_B

STEPS = 4
PROJECTIONS = {"q_proj": "q", "v_proj": "v"}


class TrainingModule(pl.LightningModule):
    """A few steps of training of a tiny peft model on random samples of its kind
    (``tests.helpers.architectures.training_samples``); AdaLoRA with its rank allocation after every optimizer
    step, as its users call it."""

    def __init__(self, model: torch.nn.Module, samples: list[dict[str, torch.Tensor]], adalora: bool = False) -> None:
        super().__init__()
        self.model = model
        self.samples = samples
        self.adalora = adalora

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # After the optimizer step, before the next zero_grad: the gradients AdaLoRA scores.
        if self.adalora:
            self.model.base_model.update_and_allocate(self.global_step)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=2e-2)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.samples, batch_size=4)


def _weight(module: torch.nn.Module) -> torch.Tensor:
    weight = module.weight.detach()
    return weight.T if type(module).__name__ == "Conv1D" else weight


def true_updates(
    arch: Architecture, pretrained: torch.nn.Module, trained, adapter: str | None = None
) -> dict[tuple[int, str], torch.Tensor]:
    """``key → merged − pretrained`` of every LoRA module, by peft's merge_and_unload of the
    trained adapter on a deep copy; a fused module's rows as its attention code takes them.
    Only the keys (how the monitor names each module's tags) come from lora_monitor."""
    from lora_monitor.adapters import find_lora_factors

    names = {key: f.module_name.removeprefix(PEFT_PREFIX) for key, f in find_lora_factors(trained, adapter).items()}
    merged = copy.deepcopy(trained).merge_and_unload(adapter_names=[adapter] if adapter else None)
    merged, base = dict(merged.named_modules()), dict(pretrained.named_modules())
    rows = probe_fused_rows(arch, pretrained) if arch.fused else None
    updates = {}
    for key, name in names.items():
        delta = (_weight(merged[name]) - _weight(base[name])).double()
        fused = rows is not None and name.rsplit(".", 1)[-1] == arch.fused.rsplit(".", 1)[-1]
        updates[key] = delta[torch.tensor(rows[key[1]])] if fused else delta
    return updates


def train(tmp_path, model, arch: Architecture = SEPARATE["llama"], adalora: bool = False, **monitor_options):
    monitor = LoRASubspaceMonitor(**monitor_options)
    trainer = make_trainer(tmp_path, [monitor], max_steps=STEPS)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        trainer.fit(TrainingModule(model, training_samples(arch), adalora=adalora))
    return monitor, read_events(trainer.logger.log_dir)


def logged_value(events, name: str, key: tuple[int, str]) -> float:
    (event,) = [e for e in events.Scalars(scalar_tag(name, key)) if e.step == STEPS]
    return event.value


def check_delta_w_norms(events, updates, monitored: Optional[Collection[str]] = None) -> None:
    """Every module of a ``monitored`` projection (by default every module peft trained: the
    monitor's default target_modules) has its ``delta_w_norm`` logged, equal to
    ‖merged − pretrained‖_F; no other is logged."""
    tags = set(events.Tags()["scalars"])
    logged = {key for key in updates if scalar_tag("delta_w_norm", key) in tags}
    wanted = {key for key in updates if monitored is None or key[1].rsplit(".", 1)[-1] in monitored}
    assert logged == wanted, sorted(updates)
    for key in logged:
        expected = torch.linalg.matrix_norm(updates[key]).item()
        assert expected > 1e-4, key  # the run really moved the weights
        assert logged_value(events, "delta_w_norm", key) == pytest.approx(expected, rel=2e-4), key


ARCHITECTURES = {**FUSED, **SEPARATE, **MORE}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_plain_lora_delta_w_of_every_architecture(tmp_path, name):
    arch = ARCHITECTURES[name]
    pretrained = base_model(arch)
    model = peft_model(arch, pretrained)
    _, events = train(tmp_path, model, arch)
    updates = true_updates(arch, pretrained, model)
    assert len(updates) >= 4, sorted(updates)  # q and v (or q, k, v) of both layers at least
    check_delta_w_norms(events, updates)


#: How people shape a LoRA beyond its variant: every Linear module of each block, some layers only.
CONFIGURATIONS = {
    "all_linear": ({"target_modules": "all-linear"}, {"q", "k", "v", "o", "gate_proj", "up_proj", "down_proj"}, {0, 1}),
    "layers_to_transform": ({"layers_to_transform": [1]}, {"q", "v"}, {1}),
}


@pytest.mark.parametrize("configuration", sorted(CONFIGURATIONS))
def test_lora_configurations_delta_w(tmp_path, configuration):
    kwargs, projections, layers = CONFIGURATIONS[configuration]
    arch = SEPARATE["llama"]
    pretrained = base_model(arch)
    model = peft_model(arch, pretrained, **kwargs)
    # All-linear: every projection monitored, at the monitor's defaults.
    _, events = train(tmp_path, model)
    updates = true_updates(arch, pretrained, model)
    assert set(updates) == {(layer, p) for layer in layers for p in projections}
    check_delta_w_norms(events, updates, projections)


def test_two_adapters_the_active_one_is_monitored(tmp_path):
    from peft import LoraConfig

    arch = SEPARATE["llama"]
    pretrained = base_model(arch)
    model = peft_model(arch, pretrained)
    randomize_lora_B(model, seed=5)  # the inactive "default" holds an update of its own
    second = LoraConfig(
        r=6, lora_alpha=12, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    model.add_adapter("second", second)
    model.set_adapter("second")
    monitor, events = train(tmp_path, model)
    updates = true_updates(arch, pretrained, model, adapter="second")
    check_delta_w_norms(events, updates)
    assert all(a.singular_values.numel() == 6 for a in monitor.latest_analysis.values())


VARIANTS = {
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "pissa": {"init_lora_weights": "pissa"},
    "olora": {"init_lora_weights": "olora"},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_delta_w_is_merged_minus_pretrained(tmp_path, variant):
    arch = SEPARATE["llama"]
    pretrained = base_model(arch)
    model = peft_model(arch, pretrained, **VARIANTS[variant])
    monitor, events = train(tmp_path, model)
    updates = true_updates(arch, pretrained, model)
    check_delta_w_norms(events, updates)
    for key, delta in updates.items():
        W0 = _weight(dict(pretrained.named_modules())[_module_path(pretrained, key)]).double()
        assert logged_value(events, "delta_w_relative_norm", key) == pytest.approx(
            (torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(W0)).item(), rel=2e-4
        )
        # Amplification against ΔW's top directions: r of them, 2r since PiSSA's initial factors.
        r = 8 if variant in ("pissa", "olora") else 4
        U, S, Vh = torch.linalg.svd(delta)
        dense = torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(U[:, :r].T @ W0 @ Vh[:r].T)
        assert logged_value(events, "delta_w_amplification", key) == pytest.approx(dense.item(), rel=1e-3)
        spectrum = monitor.latest_analysis[key].singular_values.double()
        # The whole spectrum: r (2r) values where ΔW is factored, the full one for DoRA.
        n = spectrum.numel()
        assert n == (S.numel() if variant == "dora" else r)
        torch.testing.assert_close(spectrum, S[:n], rtol=1e-3, atol=1e-6)
        assert (S[n:] < 1e-5 * S[0]).all()


def test_corda_delta_w_is_merged_minus_pretrained(tmp_path):
    """CorDA (knowledge-preserved mode) after its calibration pass over a few samples: its
    initialization moves s·B₀·A₀ out of W₀ like PiSSA's, so ΔW = s·(B·A − B₀·A₀)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    arch = SEPARATE["llama"]
    pretrained = base_model(arch)
    calibrated = copy.deepcopy(pretrained)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=list(arch.target_modules),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method="kpm"),
    )
    samples = training_samples(arch)[:4]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        preprocess_corda(
            calibrated, config, run_model=lambda: [calibrated(input_ids=s["input_ids"][None]) for s in samples]
        )
        model = get_peft_model(calibrated, config)
    _, events = train(tmp_path, model)
    check_delta_w_norms(events, true_updates(arch, pretrained, model))


def test_dora_magnitude_scalars(tmp_path):
    arch = SEPARATE["llama"]
    pretrained = base_model(arch)
    model = peft_model(arch, pretrained, use_dora=True)
    _, events = train(tmp_path, model)
    for key in ((0, "q"), (1, "v")):
        layer = dict(model.named_modules())["base_model.model." + _module_path(pretrained, key)]
        W0 = layer.get_base_layer().weight.detach().double()
        low_rank = layer.get_delta_weight("default").detach().double()  # peft: s·B·A for DoRA too
        m = layer.lora_magnitude_vector["default"].weight.detach().double()
        D = m / torch.linalg.vector_norm(W0 + low_rank, dim=1)
        assert logged_value(events, "dora_magnitude_norm", key) == pytest.approx(
            torch.linalg.matrix_norm((D - 1)[:, None] * W0).item(), rel=1e-3
        )
        assert logged_value(events, "dora_direction_norm", key) == pytest.approx(
            torch.linalg.matrix_norm(D[:, None] * low_rank).item(), rel=1e-3
        )
        assert logged_value(events, "dora_scale_std", key) == pytest.approx(
            D.std(correction=0).item(), rel=1e-3, abs=1e-7
        )


def _module_path(base: torch.nn.Module, key: tuple[int, str]) -> str:
    layer, projection = key
    for name, _ in base.named_modules():
        parts = name.split(".")
        if str(layer) in parts and PROJECTIONS.get(parts[-1]) == projection:
            return name
    raise KeyError(key)


def test_adalora_delta_w_and_kept_rank(tmp_path):
    from peft import AdaLoraConfig

    arch = SEPARATE["llama"]
    pretrained = base_model(arch)
    # Rank allocation from step 1 to 3 of 4: triplets are pruned from 6 down to a budget of 2.
    model = peft_model(
        arch,
        pretrained,
        config_class=AdaLoraConfig,
        init_r=6,
        target_r=2,
        tinit=1,
        tfinal=1,
        deltaT=1,
        total_step=STEPS,
        r=6,
    )
    monitor, events = train(tmp_path, model, adalora=True)
    check_delta_w_norms(events, true_updates(arch, pretrained, model))
    for key in ((0, "q"), (1, "v")):
        layer = dict(model.named_modules())["base_model.model." + _module_path(pretrained, key)]
        kept = int((layer.lora_E["default"] != 0).sum())
        assert logged_value(events, "adalora_kept_rank", key) == kept
    assert any(logged_value(events, "adalora_kept_rank", key) < 6 for key in monitor.latest_analysis)


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_reads_w0_through_dequantization(tmp_path, bits):
    from peft import LoraConfig, get_peft_model
    from peft.utils.integrations import dequantize_module_weight

    _, quantized = quantized_llama(tmp_path, bits)
    model = get_peft_model(
        quantized, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    _, events = train(tmp_path, model)
    for key in ((0, "q"), (1, "v")):
        layer = dict(model.named_modules())["base_model.model." + _module_path(quantized, key)]
        W0 = dequantize_module_weight(layer.get_base_layer()).detach().double()
        delta = layer.get_delta_weight("default").detach().double()
        U, S, Vh = torch.linalg.svd(delta)
        norm = torch.linalg.matrix_norm(delta)
        assert logged_value(events, "delta_w_norm", key) == pytest.approx(norm.item(), rel=2e-4)
        assert logged_value(events, "delta_w_relative_norm", key) == pytest.approx(
            (norm / torch.linalg.matrix_norm(W0)).item(), rel=1e-3
        )
        dense = norm / torch.linalg.matrix_norm(U[:, :4].T @ W0 @ Vh[:4].T)
        assert logged_value(events, "delta_w_amplification", key) == pytest.approx(dense.item(), rel=1e-3)
