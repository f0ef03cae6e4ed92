"""Fused q|k|v projections: which output rows each architecture gives q, k and v.

Each entry below follows the attention code of that architecture in transformers (the
authority, see ``docs/maths.md``): how the output of the fused module is viewed and cut.

- GPT-2 ``c_attn`` (``Conv1D``): ``.split(embed_dim)`` — contiguous thirds (k|v halves in a
  cross-attention block, whose q is ``q_attn``).
- GPT-BigCode ``c_attn``: with ``multi_query`` ``.split((embed_dim, head_dim, head_dim))`` —
  all query heads, then one key head, one value head; without it
  ``.view(num_heads, 3·head_dim).split(head_dim)`` — per head q, k, v interleaved.
- Phi-3 ``qkv_proj``: ``[:num_heads·head_dim]``, then ``num_key_value_heads·head_dim`` key
  rows, then the value rows — contiguous.
- Falcon ``query_key_value`` (``FalconAttention.forward``; ``_split_heads`` before transformers 5):
  ``new_decoder_architecture``:
  ``.view(num_kv_heads, num_heads/num_kv_heads + 2, head_dim)`` — per key-value group its
  query heads, then its key head and its value head; ``multi_query``:
  ``.view(num_heads + 2, head_dim)`` — query heads, one key head, one value head; else
  ``.view(num_heads, 3, head_dim)`` — per head q, k, v interleaved.
- GPT-NeoX ``query_key_value``: ``.view(num_heads, 3·head_size).chunk(3)`` — per head.
- BLOOM ``query_key_value`` (``_reshape``): ``.view(num_heads, 3, head_dim)`` — per head.

Every layout is one rule: the output rows are ``groups × slots × head_dim``, each slot owned by
q, k or v; a projection's rows are its slots in every group, in order — a slice where they are
contiguous, an index tensor where they are interleaved.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from lora_monitor.adapters.factors import Rows, _Entry

#: Module names that are fused q|k|v projections in some architecture.
FUSED_QKV_NAMES = ("c_attn", "qkv_proj", "query_key_value")

#: transformers ``model_type`` → the fused module name of that architecture.
_ARCHITECTURES = {
    "gpt2": "c_attn",
    "gpt_bigcode": "c_attn",
    "phi3": "qkv_proj",
    "falcon": "query_key_value",
    "gpt_neox": "query_key_value",
    "bloom": "query_key_value",
}


@dataclass(frozen=True)
class FusedSplit:
    """How one fused module is cut: ``rows[projection]``, or why it is kept whole."""

    rows: Optional[dict[str, Rows]] = None
    #: Why the module is kept whole (None when it is split or is no fused module).
    reason: Optional[str] = None


def _get(config: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        if config.get(name) is not None:
            return config[name]
    raise KeyError(names[0])


def _slot_rows(groups: int, slots: Sequence[str], head_dim: int) -> dict[str, Rows]:
    """The rows of each projection when the output is ``groups × len(slots) × head_dim``."""
    index = torch.arange(groups * len(slots) * head_dim).view(groups, len(slots), head_dim)
    rows: dict[str, Rows] = {}
    for name in dict.fromkeys(slots):
        chosen = index[:, [i for i, slot in enumerate(slots) if slot == name]].reshape(-1)
        start, stop = int(chosen[0]), int(chosen[-1]) + 1
        contiguous = stop - start == chosen.numel()
        rows[name] = slice(start, stop) if contiguous else chosen
    return rows


def _gpt2(config: Mapping[str, Any], out_features: int, in_features: int, cross: bool) -> dict[str, Rows]:
    if out_features == 3 * in_features:
        return _slot_rows(1, ("q", "k", "v"), in_features)
    if out_features == 2 * in_features and cross:
        return _slot_rows(1, ("k", "v"), in_features)  # cross-attention: q is q_attn
    raise ValueError(f"{out_features} rows for {in_features} input features, not 3·{in_features}")


def _gpt_bigcode(config: Mapping[str, Any], out_features: int, in_features: int, cross: bool) -> dict[str, Rows]:
    if cross:
        raise ValueError("a cross-attention c_attn (key|value of the encoder states)")
    if config.get("multi_query", True):
        # embed_dim query rows, then head_dim key and head_dim value rows: the shape tells.
        head_dim = (out_features - in_features) // 2
        return _slot_rows(1, ["q"] * (in_features // head_dim) + ["k", "v"], head_dim)
    heads = int(_get(config, "n_head", "num_attention_heads"))
    return _slot_rows(heads, ("q", "k", "v"), in_features // heads)


def _phi3(config: Mapping[str, Any], out_features: int, in_features: int, cross: bool) -> dict[str, Rows]:
    heads = int(_get(config, "num_attention_heads"))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or in_features // heads)
    return _slot_rows(1, ["q"] * heads + ["k"] * kv_heads + ["v"] * kv_heads, head_dim)


def _falcon(config: Mapping[str, Any], out_features: int, in_features: int, cross: bool) -> dict[str, Rows]:
    heads = int(_get(config, "num_attention_heads", "n_head"))
    head_dim = in_features // heads
    if config.get("new_decoder_architecture"):
        kv_heads = int(config.get("num_kv_heads") or heads)
        return _slot_rows(kv_heads, ["q"] * (heads // kv_heads) + ["k", "v"], head_dim)
    if config.get("multi_query", True):
        return _slot_rows(1, ["q"] * heads + ["k", "v"], head_dim)
    return _slot_rows(heads, ("q", "k", "v"), head_dim)


def _per_head(config: Mapping[str, Any], out_features: int, in_features: int, cross: bool) -> dict[str, Rows]:
    heads = int(_get(config, "num_attention_heads", "n_head"))
    return _slot_rows(heads, ("q", "k", "v"), in_features // heads)


_LAYOUTS = {
    "gpt2": _gpt2,
    "gpt_bigcode": _gpt_bigcode,
    "phi3": _phi3,
    "falcon": _falcon,
    "gpt_neox": _per_head,
    "bloom": _per_head,
}
#: Older names of the same architectures in config.json files.
_ALIASES = {"RefinedWeb": "falcon", "RefinedWebModel": "falcon"}


def _guess_model_type(last: str, out_features: int, in_features: int) -> Optional[str]:
    """The architecture of a fused Linear module from its shape alone, where that is
    unambiguous: a ``c_attn`` with fewer than 3·k rows is GPT-BigCode's multi-query one
    (k + 2·head_dim rows); any other layout needs the config."""
    if last == "c_attn" and in_features < out_features < 3 * in_features:
        return "gpt_bigcode"
    return None


def fused_split(
    module_name: str,
    out_features: int,
    in_features: int,
    config: Optional[Mapping[str, Any]],
    fan_in_fan_out: bool = False,
) -> FusedSplit:
    """How to split a module into q, k and v rows, following its architecture's attention code.

    Args:
        module_name: the module's path (its last name decides whether it may be fused).
        out_features, in_features: of the whole module, (out, in) orientation.
        config: the base model's transformers config as a mapping (``config.to_dict()``, or
            the ``config.json`` of the base model); None when it is not known.
        fan_in_fan_out: the module stores its weight (in, out) (GPT-2's ``Conv1D``).

    Returns:
        ``FusedSplit(rows=...)`` for a fused module of a known layout, ``FusedSplit(reason=...)``
        for one that must stay whole (unknown architecture, no config to tell the layout, rows
        that do not add up), ``FusedSplit()`` for a module that is not fused.
    """
    last = module_name.rsplit(".", 1)[-1]
    if last not in FUSED_QKV_NAMES:
        return FusedSplit()
    if last == "c_attn" and fan_in_fan_out:
        # A Conv1D c_attn is GPT-2's family (ImageGPT, DecisionTransformer too): thirds.
        model_type, config = "gpt2", {}
    elif config is not None and config.get("model_type") is not None:
        model_type = _ALIASES.get(config["model_type"], config["model_type"])
    else:
        guessed, config = _guess_model_type(last, out_features, in_features), {}
        if guessed is None:
            return FusedSplit(
                reason=(
                    f"the base model's config is not known, and the q|k|v layout of a {last!r} "
                    f"with {out_features} rows depends on it (per head in GPT-BigCode without "
                    f"multi_query, Falcon, GPT-NeoX, BLOOM; contiguous in GPT-2 and Phi-3); give "
                    f"the base model's config.json (base_config=) to split it"
                )
            )
        model_type = guessed
    if _ARCHITECTURES.get(model_type) != last:
        return FusedSplit(
            reason=(
                f"lora_monitor does not know how model type {model_type!r} lays out q, k and v in "
                f"{last!r}; it is monitored whole, by its name {last!r}"
            )
        )
    cross = "cross" in module_name.lower()
    try:
        rows = _LAYOUTS[model_type](config, out_features, in_features, cross)
    except (KeyError, ValueError, ZeroDivisionError) as error:
        return FusedSplit(reason=f"its {model_type} q|k|v layout cannot be read ({error})")
    total = sum((r.stop - r.start) if isinstance(r, slice) else r.numel() for r in rows.values())
    if total != out_features:
        return FusedSplit(
            reason=(
                f"the {model_type} q|k|v layout of this config gives {total} rows but lora_B has "
                f"{out_features}: the config does not belong to this model"
            )
        )
    return FusedSplit(rows=rows)


def split_entry(entry: _Entry, config: Optional[Mapping[str, Any]], fan_in_fan_out: bool) -> list[_Entry]:
    """A fused module's entry as one entry per projection (its rows), else the entry itself;
    a module named like a fused one that cannot be split is kept whole with a warning."""
    split = fused_split(entry.module_name, entry.lora_B.shape[0], entry.lora_A.shape[1], config, fan_in_fan_out)
    if split.reason is not None:
        last = entry.module_name.rsplit(".", 1)[-1]
        warnings.warn(
            f"lora_monitor: {entry.module_name} is named like a fused q|k|v projection but is "
            f"kept whole as projection {last!r}: {split.reason}",
            stacklevel=3,
        )
    if split.rows is None:
        return [entry]
    return [dataclasses.replace(entry, projection=name, rows=rows, qualifiers=[]) for name, rows in split.rows.items()]
