"""lora_monitor.integrations.lightning: :class:`LoRASubspaceMonitor` end to end with real peft
models, a real Trainer, real TensorBoard event files, and what it refuses at set-up.

Every number the monitor logs is checked against an independent dense computation: ΔW
materialized by peft's own ``get_delta_weight``, a full SVD, φ by a loop over (i, j), and the
base layer's weight W₀ for the spectral scalars, the amplification and the intruder dimensions.
"""

from __future__ import annotations

import io
import logging
import math

import matplotlib.colors
import matplotlib.image
import numpy as np
import PIL.Image
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lora_monitor import LoRAMonitorError, LoRASubspaceMonitor
from lora_monitor.outputs.plots import CARD_WIDTH, MASK_COLOR
from lora_monitor.outputs.rank_text import CAUTIONS_BELOW, summary_line
from lora_monitor.outputs.tags import (
    OPTIONAL_SCALAR_NAMES,
    OVERVIEW_TAG,
    PROBE_RANK_TAG,
    RECOMMENDATION_TAG,
    SCALAR_NAMES,
    SUGGESTED_TAG,
    heatmap_tag,
    is_monitor_tag,
    recommendation_scalars,
    scalar_tag,
    summary_metrics,
    summary_tag,
)
from tests.helpers.dense import base_weights, dense_basis, dense_phi, dense_updates
from tests.helpers.events import read_events, scalar_series
from tests.helpers.lightning import CausalLMModule, CountingModule, make_trainer
from tests.helpers.models import tiny_gpt2_lora, tiny_llama, tiny_llama_lora


def test_tensorboard_run_has_heatmaps_and_scalars(tmp_path):
    model = tiny_llama_lora(rank=4, num_layers=4, randomize_B=False)
    # The probe read at every snapshot of this short fit.
    monitor = LoRASubspaceMonitor(every_n_steps=2, reference="first", probe_budget=float("inf"))
    trainer = make_trainer(tmp_path, [monitor], max_steps=6)
    trainer.fit(CausalLMModule(model))

    events = read_events(trainer.logger.log_dir)
    tags = events.Tags()
    # The first snapshot (step 2) is the reference: no φ yet, so no heatmap and no phi scalars.
    # One image per drawn layer (all 4 of them), sized for TensorBoard's card, and the overview
    # of every layer at every snapshot.
    assert sorted(tags["images"]) == sorted([OVERVIEW_TAG] + [heatmap_tag(layer) for layer in range(4)])
    assert [image.step for image in events.Images(OVERVIEW_TAG)] == [2, 4, 6]
    for layer in range(4):
        images = events.Images(heatmap_tag(layer))
        assert [image.step for image in images] == [4, 6]
        for image in images:
            pixels = matplotlib.image.imread(io.BytesIO(image.encoded_image_string), format="png")
            assert pixels.shape[:2] == (image.height, image.width)
            # (ΔW_q, ΔW_v) side by side, no zoom at equal ranks: 4.5 × 2.55 in at 100 dpi.
            assert (image.width, image.height) == (CARD_WIDTH, 255)

    keys = [(layer, projection) for layer in range(4) for projection in ("q", "v")]
    expected = {scalar_tag(name, key) for name in SCALAR_NAMES for key in keys}
    logged = {tag for tag in tags["scalars"] if is_monitor_tag(tag)}
    # Besides the per-module series, the rank suggested at every snapshot and the medians over
    # layers of the summary metrics, per projection.
    suggested = set(recommendation_scalars(monitor.recommendation))
    medians = {summary_tag(name, p) for name in summary_metrics(2) for p in ("q", "v")}
    assert logged == expected | suggested | medians
    for tag in suggested:
        assert sorted(scalar_series(events, tag)) == [2, 4, 6]
    assert all(is_monitor_tag(tag) for tag in tags["images"])
    for key in keys:
        assert sorted(scalar_series(events, scalar_tag("delta_w_norm", key))) == [2, 4, 6]
        assert sorted(scalar_series(events, scalar_tag("phi_top", key))) == [4, 6]
        # B starts at zero and moves: the update grows.
        norms = scalar_series(events, scalar_tag("delta_w_norm", key))
        assert 0 < norms[2] < norms[6]


@pytest.mark.parametrize("basis", ["A", "B", "delta_w_left", "delta_w_right"])
def test_logged_scalars_match_dense_computation(tmp_path, basis):
    reference_model = tiny_llama_lora(rank=4, seed=1)
    reference_model.save_pretrained(str(tmp_path / "seed1"))
    model = tiny_llama_lora(rank=4, seed=0)
    monitor = LoRASubspaceMonitor(every_n_steps=3, reference=tmp_path / "seed1", basis=basis)
    trainer = make_trainer(tmp_path, [monitor], max_steps=3)
    trainer.fit(CausalLMModule(model))

    events = read_events(trainer.logger.log_dir)
    current, reference = dense_updates(model), dense_updates(reference_model)
    for key, factors in current.items():
        delta = factors[0]
        phi = dense_phi(dense_basis(*reference[key], basis), dense_basis(*factors, basis))
        sigma = torch.linalg.svdvals(delta)
        logged = {name: scalar_series(events, scalar_tag(name, key))[3] for name in SCALAR_NAMES}
        assert logged["delta_w_norm"] == pytest.approx(float(torch.linalg.matrix_norm(delta)), rel=1e-5)
        assert logged["delta_w_sigma_max"] == pytest.approx(float(sigma[0]), rel=1e-5)
        assert logged["phi_top"] == pytest.approx(float(phi[0, 0]), abs=1e-5)
        assert logged["phi_mean"] == pytest.approx(float(torch.diagonal(phi).mean()), abs=1e-5)
        torch.testing.assert_close(monitor.latest_analysis[key].phi.double(), phi, atol=1e-5, rtol=0)


def dense_shared_directions(phi: torch.Tensor, n: int, false_alarm: float = 1e-3) -> int:
    """The documented rule, written out with Python floats."""
    m = min(phi.shape)
    x = math.log(m / false_alarm)
    count = 0
    for i in range(1, m + 1):
        gain = i * float(phi[i - 1, i - 1]) - (i - 1) * (float(phi[i - 2, i - 2]) if i > 1 else 0.0)
        nu = 2 * i - 1
        if gain >= (nu + 2 * math.sqrt(nu * x) + 2 * x) / n:
            count = i
    return count


def test_spectral_scalars_amplification_and_intruders_match_dense(tmp_path, caplog):
    reference_model = tiny_llama_lora(rank=4, seed=1)
    reference_model.save_pretrained(str(tmp_path / "seed1"))
    model = tiny_llama_lora(rank=4, seed=0, randomize_B=False)
    initial_A = {key: A.clone() for key, (_, A, _) in dense_updates(model).items()}
    monitor = LoRASubspaceMonitor(every_n_steps=4, reference=tmp_path / "seed1", intruder_top_k=6)
    trainer = make_trainer(tmp_path, [monitor], max_steps=4)
    with caplog.at_level(logging.INFO):
        trainer.fit(CausalLMModule(model))

    events = read_events(trainer.logger.log_dir)
    expected_tags = {scalar_tag(n, k) for n in SCALAR_NAMES + OPTIONAL_SCALAR_NAMES for k in initial_A}
    assert expected_tags <= set(events.Tags()["scalars"])
    current, reference, W0s = dense_updates(model), dense_updates(reference_model), base_weights(model)
    for key, (delta, A, B) in current.items():
        logged = {
            name: scalar_series(events, scalar_tag(name, key))[4] for name in SCALAR_NAMES + OPTIONAL_SCALAR_NAMES
        }
        sigma = torch.linalg.svdvals(delta)[:4]
        energy = sigma.square().cumsum(0)
        assert logged["delta_w_energy_rank"] == int((energy < 0.9 * energy[-1]).sum()) + 1
        p = sigma / sigma.sum()
        assert logged["delta_w_effective_rank"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-4)
        assert logged["delta_w_stable_rank"] == pytest.approx(float(energy[-1] / sigma[0] ** 2), rel=1e-4)

        # §7.3: ‖ΔW‖_F / ‖Uᵀ W₀ V‖_F with U, V the top-r singular vectors of the dense ΔW.
        W0 = W0s[key]
        U, S, Vh = torch.linalg.svd(delta)
        projected = U[:, :4].T @ W0 @ Vh[:4].T
        amplification = torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(projected)
        assert logged["delta_w_amplification"] == pytest.approx(float(amplification), rel=1e-4)
        relative = torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(W0)
        assert logged["delta_w_relative_norm"] == pytest.approx(float(relative), rel=1e-4)

        # Shuttleworth et al.: top-6 left singular vectors of W₀ + ΔW whose best cosine with
        # any left singular vector of W₀ is below 0.5.
        base_left = torch.linalg.svd(W0).U
        merged_left = torch.linalg.svd(W0 + delta).U[:, :6]
        intruders = int(((merged_left.T @ base_left).abs().amax(1) < 0.5).sum())
        assert logged["intruder_dimensions"] == intruders

        phi = dense_phi(dense_basis(*reference[key], "A"), dense_basis(delta, A, B, "A"))
        assert logged["shared_directions"] == dense_shared_directions(phi, n=A.shape[1])
        # φ(A₀, A, r, r): the share of A's row space still spanned by its initial value.
        start, now = dense_basis(delta, initial_A[key], B, "A"), dense_basis(delta, A, B, "A")
        assert logged["a_init_similarity"] == pytest.approx(float(dense_phi(start, now)[-1, -1]), abs=1e-5)

    # The recommendation: Markdown in TensorBoard's text tab, one line in the console.
    text = events.Tensors(f"{RECOMMENDATION_TAG}/text_summary")
    assert [event.step for event in text] == [4]
    markdown = text[0].tensor_proto.string_val[0].decode()
    assert "| layer_01.v " in markdown and "shared directions" in markdown
    assert monitor.recommendation is not None and monitor.recommendation.compared
    # The report's first line is the console's, pointing below instead of at the Text tab.
    assert summary_line(monitor.recommendation, CAUTIONS_BELOW) in markdown
    assert any(r.getMessage() == f"LoRASubspaceMonitor: {summary_line(monitor.recommendation)}" for r in caplog.records)


def test_rank8_reference_against_running_rank64(tmp_path):
    rank8 = tiny_llama_lora(rank=8, hidden_size=64, randomize_B=False)
    make_trainer(tmp_path / "r8", [], max_steps=4).fit(CausalLMModule(rank8))
    rank8.save_pretrained(str(tmp_path / "r8" / "adapter"))

    rank64 = tiny_llama_lora(rank=64, alpha=128, hidden_size=64, randomize_B=False)
    monitor = LoRASubspaceMonitor(every_n_steps=2, reference=tmp_path / "r8" / "adapter")
    trainer = make_trainer(tmp_path / "r64", [monitor], max_steps=4)
    trainer.fit(CausalLMModule(rank64))

    # At the defaults every module the adapter trains: this Llama's adapter trains q_proj and v_proj.
    assert set(monitor.latest_analysis) == {(layer, p) for layer in range(2) for p in ("q", "v")}
    current, reference = dense_updates(rank64), dense_updates(rank8)
    for key, analysis in monitor.latest_analysis.items():
        assert tuple(analysis.phi.shape) == (8, 64)
        expected = dense_phi(dense_basis(*reference[key], "A"), dense_basis(*current[key], "A"))
        torch.testing.assert_close(analysis.phi.double(), expected, atol=1e-5, rtol=0)
    events = read_events(trainer.logger.log_dir)
    for layer in range(2):
        images = events.Images(heatmap_tag(layer))
        assert [image.step for image in images] == [2, 4]
        # With the smaller rank as reference each projection's row adds the zoomed i, j ≤ 8
        # panel, its cells j > i masked grey: two rows of panels, 4.5 × 3.25 in at 100 dpi.
        assert (images[0].width, images[0].height) == (CARD_WIDTH, 325)
        pixels = np.asarray(PIL.Image.open(io.BytesIO(images[0].encoded_image_string)).convert("RGB"))
        grey = np.all(pixels == np.array(matplotlib.colors.to_rgb(MASK_COLOR)) * 255, axis=-1)
        # 2 zoom panels × 28 masked cells of 8 × 8: a few thousand grey pixels, no more.
        assert 1000 < grey.sum() < 20000


def test_previous_reference_compares_consecutive_snapshots(tmp_path):
    model = tiny_llama_lora(rank=4)
    monitor = LoRASubspaceMonitor(every_n_steps=1, reference="previous", basis="delta_w_right")
    trainer = make_trainer(tmp_path, [monitor], max_steps=3, logger=CSVLogger(str(tmp_path)))
    trainer.fit(CausalLMModule(model))
    # Each step moves ΔW a little: consecutive top directions stay nearly aligned.
    assert all(a.phi[0, 0] > 0.5 for a in monitor.latest_analysis.values())
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert scalar_tag("phi_top", (0, "q")) in metrics.splitlines()[0]


@pytest.mark.parametrize(
    "make_model, monitor_kwargs, match",
    [
        (lambda: tiny_llama_lora(), dict(target_modules=["k"]), r"'k'.*q.*v"),
        (lambda: tiny_llama_lora(), dict(layers=[0, 7]), r"7"),
        (lambda: tiny_llama_lora(), dict(reference="/nonexistent/adapter"), r"/nonexistent/adapter"),
    ],
    ids=["target-matches-nothing", "layer-matches-nothing", "missing-reference"],
)
def test_configuration_errors_are_raised_at_setup(tmp_path, make_model, monitor_kwargs, match):
    module = CountingModule(make_model())
    trainer = make_trainer(tmp_path, [LoRASubspaceMonitor(**monitor_kwargs)], max_steps=2)
    with pytest.raises(LoRAMonitorError, match=match):
        trainer.fit(module)
    assert module.steps_run == 0


def test_model_without_lora_is_rejected_at_setup(tmp_path):
    module = CountingModule(tiny_llama(num_layers=1))
    trainer = make_trainer(tmp_path, [LoRASubspaceMonitor()], max_steps=2)
    with pytest.raises(LoRAMonitorError, match=r"LoRA"):
        trainer.fit(module)
    assert module.steps_run == 0


def test_no_logger_is_rejected_at_setup(tmp_path):
    trainer = make_trainer(tmp_path, [LoRASubspaceMonitor()], max_steps=2, logger=False)
    with pytest.raises(MisconfigurationException, match="no logger"):
        trainer.fit(CausalLMModule(tiny_llama_lora()))


def test_fused_c_attn_is_split_into_q_and_v(tmp_path):
    model = tiny_gpt2_lora(rank=4)
    monitor = LoRASubspaceMonitor(every_n_steps=2, reference="first", basis="delta_w_left")
    trainer = make_trainer(tmp_path, [monitor], max_steps=4)
    trainer.fit(CausalLMModule(model))
    # At the defaults every module the adapter trains: c_attn split into its q, k and v.
    assert set(monitor.latest_analysis) == {(layer, p) for layer in range(2) for p in ("q", "k", "v")}
    assert all(a.phi.shape == (4, 4) for a in monitor.latest_analysis.values())


def test_the_functional_probe_reads_training_step_and_changes_no_training(tmp_path):
    """With the probe (the default) and without: the same training losses, bit for bit; with
    it, a probe reading at every snapshot whose whole-update loss is ``training_step``'s loss
    on the fit's first batch, the model in eval mode."""
    runs = {}
    for probe in (True, False):
        torch.manual_seed(0)
        model = tiny_llama_lora(rank=4)
        monitor = LoRASubspaceMonitor(
            every_n_steps=2, log_images=False, functional_probe=probe, probe_budget=float("inf")
        )  # read at every snapshot of this short fit
        trainer = make_trainer(tmp_path / str(probe), [monitor], max_steps=6)
        module = CausalLMModule(model)
        trainer.fit(module)
        runs[probe] = (model, module, monitor, read_events(trainer.logger.log_dir))
    (model, module, monitor, events), (_, _, plain, plain_events) = runs[True], runs[False]
    assert scalar_series(events, "train_loss") == scalar_series(plain_events, "train_loss")
    assert sorted(scalar_series(events, "train_loss")) == list(range(6))  # the probe's self.log dropped
    assert sorted(scalar_series(events, PROBE_RANK_TAG)) == [2, 4, 6]
    assert PROBE_RANK_TAG not in plain_events.Tags()["scalars"] and plain.recommendation.probe is None
    reading = monitor.recommendation.probe
    (tokens,) = next(iter(module.train_dataloader()))
    model.eval()
    with torch.no_grad():
        assert reading.losses[4] == pytest.approx(float(model(input_ids=tokens, labels=tokens).loss), rel=1e-5)
    assert reading.losses[0] > reading.losses[4]  # the update lowered the first batch's loss


def test_manual_optimization_has_no_probe_and_says_so_once(tmp_path, caplog):
    class Manual(CausalLMModule):
        def __init__(self, model):
            super().__init__(model)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            optimizer = self.optimizers()
            loss = super().training_step(batch, batch_idx)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()

    monitor = LoRASubspaceMonitor(every_n_steps=2, log_images=False)
    with caplog.at_level(logging.INFO):
        make_trainer(tmp_path, [monitor], max_steps=4).fit(Manual(tiny_llama_lora(rank=4)))
    said = [r.getMessage() for r in caplog.records if "functional probe" in r.getMessage()]
    assert len(said) == 1 and "probe does not run: under manual optimization" in said[0]
    assert monitor.recommendation.probe is None
    assert monitor.recommendation.cautions[0].startswith("spectrum only")


@pytest.mark.parametrize("planned", [dict(max_steps=6), dict(max_steps=-1, max_epochs=1)])
def test_the_last_snapshot_says_what_the_end_of_fit_says(tmp_path, planned):
    """At the default probe budget a short fit is probed at its end only; where the fit ends on a
    snapshot's step (``max_steps``, or Lightning's estimate from the epochs: 8 batches), that
    snapshot is the end's: its TensorBoard cards carry the reading the recommendation rests on."""
    monitor = LoRASubspaceMonitor(every_n_steps=2, log_images=False)
    trainer = make_trainer(tmp_path, [monitor], **planned)
    trainer.fit(CausalLMModule(tiny_llama_lora(rank=4)))
    last = trainer.global_step
    assert last == (6 if trainer.max_steps > 0 else 8)
    events = read_events(trainer.logger.log_dir)
    recommendation = monitor.recommendation
    assert recommendation.probe is not None and recommendation.probe.rank is not None
    assert scalar_series(events, PROBE_RANK_TAG) == {last: recommendation.probe.rank}  # read there only
    assert scalar_series(events, SUGGESTED_TAG)[last] == recommendation.rank
