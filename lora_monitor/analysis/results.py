"""What a snapshot says about each module, on the host: :class:`ModuleAnalysis`.

Its scalars carry the names they are logged under (``lora_monitor.<name>/layer_<L>.<p>``), each
naming the matrix it describes: ``delta_w_*`` of ΔW (merged minus pretrained weight),
``a_init_similarity`` of A, ``phi_*`` and ``shared_directions`` of the singular vectors of the
monitor's basis. :mod:`lora_monitor.outputs.tags` describes every one.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from lora_monitor.adapters import LoRAFactors, ModuleKey
from lora_monitor.analysis.rank_rule import RULE
from lora_monitor.analysis.update_factors import UpdateFactors, unknown_because
from lora_monitor.functional.bases import Basis, basis_info
from lora_monitor.functional.similarity import shared_directions
from lora_monitor.functional.spectra import effective_rank, energy_rank, frobenius_norm, gap_rank, stable_rank

#: The share of ‖ΔW‖_F² the energy rank holds (a column of the tables, not evidence).
ENERGY = 0.9


def spectral_statistics(s: Tensor) -> dict[str, float]:
    """The six numbers of ΔW's spectrum ``s`` (decreasing) the monitor logs and the rank rule and
    the tables read, by their tag names: computed here, and nowhere else."""
    return {
        "delta_w_norm": float(frobenius_norm(s)),
        "delta_w_sigma_max": float(s[0]) if s.numel() else 0.0,
        "delta_w_gap_rank": float(gap_rank(s, RULE.gap_ratio, RULE.gap_floor)),
        "delta_w_energy_rank": float(energy_rank(s, ENERGY)),
        "delta_w_effective_rank": float(effective_rank(s)),
        "delta_w_stable_rank": float(stable_rank(s)),
    }


#: The per-module scalars, in the order the custom-scalars layout lists them; those that need
#: W₀, a reference or the initial factors only when the run has them.
SCALAR_NAMES = (
    "delta_w_norm",
    "delta_w_sigma_max",
    "phi_top",
    "phi_mean",
    "shared_directions",
    "delta_w_gap_rank",
    "delta_w_energy_rank",
    "delta_w_effective_rank",
    "delta_w_stable_rank",
    "delta_w_amplification",
    "delta_w_relative_norm",
    "a_init_similarity",
)
#: Scalars computed only when asked for (``intruder_top_k``).
OPTIONAL_SCALAR_NAMES = ("intruder_dimensions",)
#: Scalars of the modules of some peft variants only (DoRA's two parts of ΔW and the spread of
#: its row scale D; AdaLoRA's kept rank): see :class:`ModuleAnalysis`.
VARIANT_SCALAR_NAMES = ("dora_magnitude_norm", "dora_direction_norm", "dora_scale_std", "adalora_kept_rank")
#: The scalars computed per module on the device (:mod:`lora_monitor.analysis.device`), by name.
DEVICE_SCALAR_NAMES = (
    "delta_w_amplification",
    "delta_w_relative_norm",
    "intruder_dimensions",
    "a_init_similarity",
    *VARIANT_SCALAR_NAMES,
)
_COUNTS = ("intruder_dimensions", "adalora_kept_rank")

#: Tensor dtypes that pickle as numpy arrays.
_NUMPY_DTYPES = (torch.float32, torch.float64)


@dataclass
class ModuleAnalysis:
    """What one snapshot says about one module, on the host.

    ``phi`` is the grid φ(reference, current, i, j) of shape ``(r_ref, r_cur)`` in the chosen
    basis (None without a reference); ``singular_values`` the spectrum of the current ΔW.

    Attributes:
        dimension: n, the dimension of the space the basis vectors live in (k for ``"A"`` and
            ``"delta_w_right"``, d for ``"B"`` and ``"delta_w_left"``); φ's chance level is
            max(i, j)/n.
        basis_singular_values, reference_basis_singular_values: the singular values that order
            the basis vectors (of A, B or ΔW) of the current update and of the reference: a
            small gap between two of them means their directions can swap between runs.
        delta_w_amplification: ‖ΔW‖_F / ‖Uᵀ W₀ V‖_F (the paper's §7.3); None without W₀.
        delta_w_relative_norm: ‖ΔW‖_F / ‖W₀‖_F; None without W₀.
        intruder_dimensions: among the top-k singular vectors of W₀ + ΔW, those far from every
            singular vector of W₀; None unless asked for (``intruder_top_k``).
        a_init_similarity: φ(A₀, A, r, r), the share of A's row space still spanned by its
            initial value A₀ (1: unchanged; chance r/k); None without an initial snapshot.
        delta_w_known: False when the update the model applies cannot be computed from what
            the run has (a PiSSA-like initialization without its initial factors, DoRA without
            W₀): then no ΔW number is logged, and ``notes`` says why.
        notes: what was left out of this module's analysis and why (not errors: φ in the
            factors' own bases is still right).
        dora_magnitude_norm: DoRA only: ‖(D − I)·W₀‖_F, the part of ΔW that rescales W₀'s rows
            (D = diag(m / ‖row of W₀ + s·B·A‖)).
        dora_direction_norm: DoRA only: ‖D·s·B·A‖_F, the low-rank directional term (the one φ
            reads).
        dora_scale_std: DoRA only: the standard deviation of D's diagonal over rows (0 when
            every row is rescaled alike).
        adalora_kept_rank: AdaLoRA only: the number of singular values E it keeps (non-zero).
    """

    key: ModuleKey
    singular_values: Tensor
    phi: Optional[Tensor] = None
    problems: list[str] = field(default_factory=list)
    dimension: Optional[int] = None
    basis_singular_values: Optional[Tensor] = None
    reference_basis_singular_values: Optional[Tensor] = None
    delta_w_amplification: Optional[float] = None
    delta_w_relative_norm: Optional[float] = None
    intruder_dimensions: Optional[int] = None
    a_init_similarity: Optional[float] = None
    delta_w_known: bool = True
    notes: list[str] = field(default_factory=list)
    dora_magnitude_norm: Optional[float] = None
    dora_direction_norm: Optional[float] = None
    dora_scale_std: Optional[float] = None
    adalora_kept_rank: Optional[int] = None

    def __getstate__(self) -> dict[str, Any]:
        # Pickled as numpy arrays, each with its own bytes: torch pickles a tensor through
        # torch.save (≈ 0.1 ms each) and with its whole storage (for these, the buffer of one
        # host transfer), which made gathering the analyses across ranks cost more than them.
        return {
            name: value.numpy() if isinstance(value, Tensor) and value.dtype in _NUMPY_DTYPES else value
            for name, value in vars(self).items()
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(
            {name: torch.from_numpy(value) if isinstance(value, np.ndarray) else value for name, value in state.items()}
        )

    @property
    def shared_directions(self) -> Optional[int]:
        """How many top directions the reference and the update share clearly above chance
        (:func:`lora_monitor.functional.shared_directions`); None without φ."""
        if self.phi is None or self.dimension is None:
            return None
        return int(shared_directions(self.phi, self.dimension))

    @property
    def scalars(self) -> dict[str, float]:
        """The per-module scalars logged, by name (:data:`SCALAR_NAMES` and the others)."""
        s = self.singular_values
        if not torch.isfinite(s).all():
            return {}  # non-finite factors: log nothing rather than NaN that breaks plots
        values = spectral_statistics(s) if self.delta_w_known else {}
        if self.phi is not None:
            values["phi_top"] = float(self.phi[0, 0])
            values["phi_mean"] = float(torch.diagonal(self.phi).mean())
        optional = {"shared_directions": self.shared_directions}
        optional |= {name: getattr(self, name) for name in DEVICE_SCALAR_NAMES}
        values.update({name: float(v) for name, v in optional.items() if v is not None})
        return {name: value for name, value in values.items() if math.isfinite(value)}


def assemble(
    host_results: Mapping[ModuleKey, Mapping[str, Tensor]],
    dimensions: Mapping[ModuleKey, int],
    updates: Mapping[ModuleKey, UpdateFactors],
    reference: Optional[Mapping[ModuleKey, LoRAFactors]],
    initial: Optional[Mapping[ModuleKey, LoRAFactors]],
    basis: Basis,
) -> dict[ModuleKey, ModuleAnalysis]:
    """The :class:`ModuleAnalysis` of each module from its results on the host, with the
    problems that make its φ undefined (non-finite factors, a zero basis matrix, an update
    that cannot be known in a basis of ΔW)."""
    info = basis_info(basis)
    analyses = {}
    for key, values in host_results.items():
        scalar: dict[str, Any] = {name: values[name].item() for name in DEVICE_SCALAR_NAMES if name in values}
        for name in _COUNTS:  # counts are integers; a negative count means "not computable"
            scalar[name] = int(scalar[name]) if scalar.get(name, -1) >= 0 else None
        update = updates[key]
        analysis = ModuleAnalysis(
            key=key,
            singular_values=values["singular_values"],
            phi=values.get("phi"),
            dimension=dimensions[key],
            basis_singular_values=values["basis_singular_values"],
            reference_basis_singular_values=values.get("reference_basis_singular_values"),
            delta_w_known=update.known,
            notes=list(update.notes),
            **scalar,
        )
        roles = (
            ("", values["singular_values"], values["basis_singular_values"]),
            (
                "the reference's ",
                values.get("reference_singular_values"),
                values.get("reference_basis_singular_values"),
            ),
        )
        for role, spectrum, basis_spectrum in roles:
            if spectrum is None or basis_spectrum is None:
                continue
            if not torch.isfinite(spectrum).all():
                analysis.problems.append(f"{role}LoRA factors hold NaN or Inf")
            elif not basis_spectrum.any():
                # peft starts with lora_B = 0: in bases "B" and "delta_w_*" φ is then undefined.
                analysis.problems.append(f"{role}{info.factor} is exactly zero, so its singular vectors are undefined")
        if not update.known and info.of_update:
            analysis.problems.append(f"φ in basis {basis!r} needs ΔW, which is not known ({update.notes[0]})")
        elif reference is not None and info.of_update:
            reference_unknown = unknown_because(reference[key], (initial or {}).get(key))
            if reference_unknown is not None:
                # Said once per run (a note), not as a problem at every snapshot.
                analysis.notes.append(
                    f"the reference is {reference[key].variant} and its ΔW cannot be computed "
                    f"({reference_unknown}), so φ in basis {basis!r} is not computed (φ in 'A' "
                    f"and 'B' is)"
                )
                analysis.phi = None
        if analysis.problems:
            analysis.phi = None
        analyses[key] = analysis
    return analyses


def new_notes(analyses: Mapping[ModuleKey, ModuleAnalysis], given: set[str]) -> list[str]:
    """The notes of ``analyses`` (what was left out, and why) not yet in ``given``, one message
    per distinct note naming its modules; ``given`` is updated, so that a run hears each once."""
    modules: dict[str, list[str]] = defaultdict(list)
    for (layer, projection), analysis in sorted(analyses.items()):
        for note in analysis.notes:
            if note not in given:
                modules[note].append(f"layer {layer} {projection!r}")
    given.update(modules)
    return [f"{', '.join(names)}: {note}" for note, names in modules.items()]
