"""What each LoRA module adapts: its kind (q, k, v, o, gate, up, down) and its group (attention
or MLP), across the names architectures give them.

A transformer block's seven matrices have many names: Llama's ``q_proj`` … ``down_proj``,
BERT's ``query``/``key``/``value`` and its three ``dense`` (``attention.output.dense``: o,
``intermediate.dense``: up, ``output.dense``: down), GPT-2's ``c_attn`` (q|k|v, split by
:mod:`lora_monitor.adapters.fused`), ``attn.c_proj`` (o), ``mlp.c_fc`` (up), ``mlp.c_proj``
(down), OPT's and BART's ``fc1``/``fc2``, T5's ``o``, ``wi``/``wi_0``/``wi_1`` and ``wo``,
Mixtral's experts' ``w1``/``w3``/``w2``, Falcon's and GPT-NeoX's ``dense``,
``dense_h_to_4h``/``dense_4h_to_h``. A module whose name is none of these keeps its own name as
its kind and belongs to no group (a classification head, an unknown layer): the probe cuts it
with every module, never with one group.

The groups are what the functional probe reads apart (:mod:`lora_monitor.engine.probe_runner`):
attention cut with the MLP whole, the MLP cut with attention whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Optional

from lora_monitor.adapters.factors import LoRAFactors, ModuleKey

#: The two groups of a transformer block the probe reads apart.
ATTENTION, MLP = "attention", "mlp"
GROUPS = (ATTENTION, MLP)

#: The kinds of a block's matrices, in block order, and their group.
KIND_GROUPS = {
    "q": ATTENTION,
    "k": ATTENTION,
    "v": ATTENTION,
    "qkv": ATTENTION,
    "o": ATTENTION,
    "gate": MLP,
    "gate_up": MLP,
    "up": MLP,
    "down": MLP,
}

#: A module's last name → its kind, where the name alone tells.
_BY_NAME = {
    **dict.fromkeys(("q_proj", "query", "q", "q_lin", "q_attn"), "q"),
    **dict.fromkeys(("k_proj", "key", "k", "k_lin"), "k"),
    **dict.fromkeys(("v_proj", "value", "v", "v_lin"), "v"),
    **dict.fromkeys(("c_attn", "qkv_proj", "query_key_value", "Wqkv", "qkv"), "qkv"),
    **dict.fromkeys(("o_proj", "out_proj", "o", "out_lin"), "o"),
    **dict.fromkeys(("gate_proj", "w1", "wi_0"), "gate"),
    **dict.fromkeys(("gate_up_proj",), "gate_up"),
    **dict.fromkeys(("up_proj", "w3", "wi_1", "wi", "fc1", "c_fc", "dense_h_to_4h", "lin1", "fc_in"), "up"),
    **dict.fromkeys(("down_proj", "w2", "wo", "fc2", "dense_4h_to_h", "lin2", "fc_out"), "down"),
}


def _in_attention(parts: Iterable[str]) -> bool:
    return any("attn" in part.lower() or "attention" in part.lower() for part in parts)


def module_kind(projection: str, module_name: Optional[str] = None) -> str:
    """The kind of a module: ``"q"``, ``"k"``, ``"v"``, ``"o"``, ``"gate"``, ``"up"``,
    ``"down"`` (``"qkv"`` for a fused q|k|v module kept whole, ``"gate_up"`` for Phi-3's fused
    ``gate_up_proj``), else its own last name.

    Args:
        projection: its canonical projection (``"q"``, ``"attention.dense"``, ``"gate_proj"``).
        module_name: its path in the model, where known: it tells BERT's, Falcon's and GPT-2's
            ``dense``/``c_proj`` apart (inside an attention block: o; else the MLP's up or down).
    """
    last = projection.rsplit(".", 1)[-1]
    if last in ("q", "k", "v", "o"):
        return last
    parts = (module_name or projection).split(".")
    name = parts[-1] if module_name is not None else last
    if name in ("dense", "c_proj"):
        if _in_attention(parts[:-1]):
            return "o"
        if name == "c_proj" and "mlp" in parts:
            return "down"
        if name == "dense" and "intermediate" in parts:
            return "up"
        if name == "dense" and "output" in parts:
            return "down"
        return name
    return _BY_NAME.get(name, name)


def block_order(module_name: str) -> int:
    """Where a module's kind comes in a block (q, k, v, o, gate, up, down; others last), to list
    modules as a block holds them."""
    order = list(KIND_GROUPS)
    kind = module_kind(module_name.rsplit(".", 1)[-1], module_name)
    return order.index(kind) if kind in order else len(order)


def module_group(projection: str, module_name: Optional[str] = None) -> Optional[str]:
    """The group of a module (:data:`ATTENTION` or :data:`MLP`), None for a module of no known
    kind (a head, an unknown layer)."""
    return KIND_GROUPS.get(module_kind(projection, module_name))


def groups_of(factors: Mapping[ModuleKey, LoRAFactors]) -> dict[ModuleKey, str]:
    """Each module's group, for the modules that have one."""
    groups = {key: module_group(f.projection, f.module_name) for key, f in factors.items()}
    return {key: group for key, group in groups.items() if group is not None}


def uncovered_projections(
    trained: Mapping[ModuleKey, LoRAFactors], monitored: Mapping[ModuleKey, LoRAFactors]
) -> list[str]:
    """The projections the adapter trains that ``monitored`` leaves out, in block order (q, k,
    v, o, gate, up, down, then the others by name; empty when every trained module is
    monitored)."""
    left_out = {
        f.projection: module_kind(f.projection, f.module_name) for key, f in trained.items() if key not in monitored
    }
    order = list(KIND_GROUPS)
    return sorted(left_out, key=lambda p: (order.index(left_out[p]) if left_out[p] in order else len(order), p))


@dataclass(frozen=True)
class TrainedModule:
    """One LoRA module of the adapter, as the per-kind answer counts it.

    Attributes:
        name: its path in the model (a fused q|k|v module once, whatever its projections).
        keys: the monitor's keys of its projections.
        group: :data:`ATTENTION`, :data:`MLP` or None.
        in_features, out_features, rank: of its whole update (A: rank × in, B: out × rank).
    """

    name: str
    keys: tuple[ModuleKey, ...]
    group: Optional[str]
    in_features: int
    out_features: int
    rank: int

    def parameters(self, rank: Optional[int] = None) -> int:
        """The LoRA parameters of this module at ``rank`` (its own by default)."""
        return (self.rank if rank is None else min(rank, self.rank)) * (self.in_features + self.out_features)


def trained_modules(factors: Mapping[ModuleKey, LoRAFactors]) -> list[TrainedModule]:
    """The modules behind ``factors``, one per module path (a split fused module's projections
    together: they share A and each holds its rows of B)."""
    by_name: dict[str, list[tuple[ModuleKey, LoRAFactors]]] = {}
    for key, f in factors.items():
        by_name.setdefault(f.module_name, []).append((key, f))
    modules = []
    for name, parts in by_name.items():
        first = parts[0][1]
        out = first.lora_B.shape[0] if first.rows is not None else sum(f.out_features for _, f in parts)
        groups = {module_group(f.projection, f.module_name) for _, f in parts}
        group = groups.pop() if len(groups) == 1 else None
        modules.append(TrainedModule(name, tuple(k for k, _ in parts), group, first.in_features, out, first.rank))
    return modules
