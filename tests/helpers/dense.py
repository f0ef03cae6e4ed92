"""Independent dense references for what the monitor computes from factors: ΔW materialized by
peft's own ``get_delta_weight``, full SVDs, and φ by the LoRA paper's definition, a loop over
(i, j)."""

from __future__ import annotations

import torch

from lora_monitor.adapters import LoRAFactors
from tests.helpers.models import lora_layers, lora_layers_by_key


def dense_updates(model: torch.nn.Module) -> dict[tuple[int, str], tuple[torch.Tensor, ...]]:
    """``(layer, projection) → (ΔW, lora_A, lora_B)`` in float64, ΔW from peft's get_delta_weight."""
    updates = {}
    for key, module in lora_layers_by_key(model).items():
        delta = module.get_delta_weight("default").detach().double()
        factors = (module.lora_A["default"].weight, module.lora_B["default"].weight)
        updates[key] = (delta, *(f.detach().double() for f in factors))
    return updates


def base_weights(model: torch.nn.Module) -> dict[tuple[int, str], torch.Tensor]:
    """``(layer, projection) → W₀`` in float64, the weight of each LoRA layer's base layer."""
    return {key: module.get_base_layer().weight.detach().double() for key, module in lora_layers_by_key(model).items()}


def dense_basis(delta: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, basis: str) -> torch.Tensor:
    """The top-r singular vectors of ``basis`` (A's right, B's left, ΔW's left or right) by a
    full SVD, r = ``lora_A``'s rank."""
    rank = lora_A.shape[0]
    if basis == "A":
        return torch.linalg.svd(lora_A).Vh[:rank].T
    if basis == "B":
        return torch.linalg.svd(lora_B).U[:, :rank]
    U, _, Vh = torch.linalg.svd(delta)
    return U[:, :rank] if basis == "delta_w_left" else Vh[:rank].T


def dense_phi(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """φ(i, j) = ‖U[:, :i]ᵀ V[:, :j]‖_F² / min(i, j), the paper's definition, by a double loop,
    in float64."""
    U, V = U.double(), V.double()
    phi = torch.empty(U.shape[1], V.shape[1], dtype=torch.float64)
    for i in range(1, U.shape[1] + 1):
        for j in range(1, V.shape[1] + 1):
            phi[i - 1, j - 1] = (U[:, :i].T @ V[:, :j]).square().sum() / min(i, j)
    return phi


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def factor_delta(f: LoRAFactors) -> torch.Tensor:
    """s·B·A of one module's factors."""
    return f.scaling * f.lora_B.detach() @ f.lora_A.detach()


def peft_deltas(model: torch.nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """peft's own ΔW of each LoRA module, in the (out, in) orientation of nn.Linear."""
    result = {}
    for name, layer in lora_layers(model):
        if adapter not in layer.lora_A:
            continue
        with torch.no_grad():
            d = layer.get_delta_weight(adapter)
        result[name] = d.T if layer.fan_in_fan_out else d
    return result


def assert_match_peft(factors: dict, model: torch.nn.Module, adapter: str = "default") -> None:
    """Each factor's s·B·A equals its rows of peft's get_delta_weight (row blocks for c_attn)."""
    deltas = peft_deltas(model, adapter)
    covered = {name: 0 for name in deltas}
    for f in factors.values():
        expected_full = deltas[f.module_name]
        if f.module_name.endswith("c_attn"):  # fused q|k|v, or k|v in GPT-2 cross-attention
            parts = "qkv" if expected_full.shape[0] == 3 * expected_full.shape[1] else "kv"
            d = expected_full.shape[0] // len(parts)
            block = parts.index(f.projection.rsplit(".", 1)[-1])
            expected = expected_full[block * d : (block + 1) * d]
        else:
            expected = expected_full
        assert expected.norm() > 0
        assert factor_delta(f).shape == expected.shape
        assert relative_error(factor_delta(f), expected) < 1e-5
        covered[f.module_name] += f.out_features
    assert covered == {name: d.shape[0] for name, d in deltas.items()}
