"""Random :class:`~lora_monitor.adapters.LoRAFactors` of given shapes, without peft: inputs of
the analysis, the outputs and the figures where no model is needed."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from lora_monitor.adapters import LoRAFactors


def random_factors(
    layers: int,
    projections: Iterable[str],
    rank: int,
    seed: int,
    n: int = 16,
    *,
    in_features: int | None = None,
    dtype: torch.dtype = torch.float32,
    scaling: Callable[[str], float] = lambda projection: 1.0,
    with_base_weight: bool = True,
    module_name: str = "model.layers.{layer}.{projection}",
) -> dict[tuple[int, str], LoRAFactors]:
    """``(layer, projection) → factors`` for ``range(layers)`` × ``projections``: A (rank × k),
    B (n × rank) and, ``with_base_weight``, W₀ (n × k) drawn in that order from ``seed``
    (k = ``in_features``, else ``n``)."""
    k = n if in_features is None else in_features
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype)

    return {
        (layer, p): LoRAFactors(
            module_name=module_name.format(layer=layer, projection=p),
            layer=layer,
            projection=p,
            lora_A=draw(rank, k),
            lora_B=draw(n, rank),
            scaling=scaling(p),
            base_weight=draw(n, k) if with_base_weight else None,
        )
        for layer in range(layers)
        for p in projections
    }


def factors_without_base(rank: int, seed: int) -> dict[tuple[int, str], LoRAFactors]:
    """Three layers of q and v in float64, B 24 × rank and A rank × 20, scaling 2 (q) and
    −0.5 (v), no W₀: the analysis of the factors alone."""
    return random_factors(
        3,
        ("q", "v"),
        rank,
        seed,
        n=24,
        in_features=20,
        dtype=torch.float64,
        scaling=lambda p: -0.5 if p == "v" else 2.0,
        with_base_weight=False,
        module_name="layers.{layer}.{projection}_proj",
    )
