"""The singular-vector bases φ can be computed in: the one table that describes them.

Pure Python (no torch), so that the command line can offer the choices without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Basis = Literal["A", "B", "delta_w_left", "delta_w_right"]


@dataclass(frozen=True)
class BasisInfo:
    """What one basis is.

    Attributes:
        name: the option's value (``basis=``).
        matrix: the matrix whose singular vectors it takes, as tables and messages name it
            (``A``, ``B``, ``ΔW``).
        factor: the tensor as peft names it (``lora_A``, ``lora_B``), or ``ΔW``.
        symbol: the matrix in a figure's mathtext.
        space: ``"input"`` (vectors of ℝ^k, k = in_features) or ``"output"`` (ℝ^d).
        of_update: True when the vectors are ΔW's own, so that they need the update the model
            applies (a variant's, not only the factors).
        description: what it is, for help texts.
    """

    name: str
    matrix: str
    factor: str
    symbol: str
    space: Literal["input", "output"]
    of_update: bool
    description: str


#: Every basis, by name. ``"A"`` is the paper's choice (Section 7.2 and its figures).
BASES: dict[str, BasisInfo] = {
    info.name: info
    for info in (
        BasisInfo("A", "A", "lora_A", "A", "input", False, "right singular vectors of lora_A (the paper's figure)"),
        BasisInfo("B", "B", "lora_B", "B", "output", False, "left singular vectors of lora_B"),
        BasisInfo(
            "delta_w_left", "ΔW", "ΔW", r"\Delta W^{\mathrm{left}}", "output", True, "left singular vectors of ΔW"
        ),
        BasisInfo(
            "delta_w_right", "ΔW", "ΔW", r"\Delta W^{\mathrm{right}}", "input", True, "right singular vectors of ΔW"
        ),
    )
}


def basis_info(basis: str) -> BasisInfo:
    """The entry of ``basis``; a ``ValueError`` naming the choices for anything else."""
    try:
        return BASES[basis]
    except (KeyError, TypeError):
        raise ValueError(f"unknown basis {basis!r}; expected one of {', '.join(map(repr, BASES))}") from None
