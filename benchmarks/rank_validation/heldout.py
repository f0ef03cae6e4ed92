"""Held-out cases: the rule's constants were chosen on :data:`~rank_validation.cases.PLANTED_CASES`
and the example task (the *tuning* cases); these cases were fixed, and committed, before any of
them was run, and no constant of the rule may be chosen on them (issue 22).

Each is a planted-rank teacher/student case as in the tuning set (the teacher is the base model
with a planted update ``U diag(σ) Vᵀ`` on some of its linear modules, the student the base model +
LoRA trained to match the teacher's last hidden states, masked MSE, 300 steps of 16 sequences),
varying what the tuning cases held fixed:

- the modules: all-linear adapters on MiniLM (BERT names ``query``, ``key``, ``value``,
  ``attention.output.dense``, ``intermediate.dense``, ``output.dense``; kinds q, k, v, o, up,
  down) with the planted update in attention and MLP, equal ranks by kind and different ones;
- the recipe: rsLoRA (``use_rslora=True``, α = r: scaling √r), α = 2r, lr 3× lower (3.3e-4)
  and 3× higher (3e-3), a cosine schedule with a linear warm-up (10 % of the steps, then cosine
  decay to 0 from lr 1e-3);
- planted ranks above the tuning set's 8: K = 16 and 24 (q and v), at r = 64 and at r = 8;
- a causal LM: a tiny random Llama (``LlamaConfig``: 4 layers, width 128, MLP 256, 4 heads,
  vocabulary 256; built locally from a seed) whose teacher has the planted update, the student
  trained to match the teacher's last hidden states (after the final norm) on random token
  sequences — hidden-state matching, as for MiniLM; LoRA on q, v and on all seven linear kinds.

Planted σ: on MiniLM's q and v 0.5 (the tuning cases' value); on its other modules 0.5 × the
median singular value of that W₀ over the median of the same layer's q and v (the MLP's weights
are ~2× larger); on the random Llama 2‖W₀‖_F/√n_out, twice a typical singular value (as in
``tests/end_to_end/test_planted_rank.py``). Directions are a fresh random draw (seeds unlike the
tuning cases'). Where nothing else is said: α = r, AdamW lr 1e-3 (weight decay 0.01), constant lr.

A second set (``batch=2``) was fixed and committed after the first set had been read and the
rule changed on 7 December 2026 (the probe measured to its lowest loss; "too small" above r/2),
before any of it was run: the first set can no longer tell whether those changes generalize, the
second can. It varies the same things in other combinations: planted K = 8 on the causal LM and
different ranks by kind there, rsLoRA on an all-linear causal LM, K = 12 on MiniLM under rsLoRA,
a 3× higher lr, α = 2r with a cosine schedule, and K = 3 at a 3× lower lr.

The truth k* and the targets are the tuning cases': the knee of the truncation curve of the trained
r = 64 run (one seed here), the suggestion within [k*, 2k*] at 25 % and at 100 % of training from
that run; every run below k* says "r may be too small" by half of training, none at r ≥ 2k*.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The kinds of linear module, by model: kind → the module's path inside one layer.
MODULE_PATHS: dict[str, dict[str, str]] = {
    "minilm": {
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "o": "attention.output.dense",
        "up": "intermediate.dense",
        "down": "output.dense",
    },
    "llama": {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    },
}

ATTENTION = ("q", "k", "v", "o")
MLP = ("gate", "up", "down")
QV = ("q", "v")
ALL_MINILM = tuple(MODULE_PATHS["minilm"])
ALL_LLAMA = tuple(MODULE_PATHS["llama"])

#: Fractions of training at which a held-out run saves its factors (the readings' points).
HELDOUT_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)

#: The tiny random Llama: built from this config and seed (nothing is downloaded).
LLAMA_CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=256,
    max_position_embeddings=64,
)
LLAMA_SEED = 0


@dataclass(frozen=True)
class HeldoutCase:
    """A held-out planted case.

    Attributes:
        name: the case's name.
        model: ``"minilm"`` (the real pretrained all-MiniLM-L6-v2) or ``"llama"`` (tiny, random).
        lora: the kinds LoRA is put on.
        planted: ``((kinds, K), ...)``: K flat planted directions on every layer's modules of
            those kinds.
        ranks: the LoRA ranks trained (one seed each); 64 is the run the suggestion and the
            truth are read from, the others are below the truth ("too small").
        lr, schedule: peak learning rate; ``"constant"`` or ``"cosine"`` (linear warm-up over
            ``warmup`` of the steps, then cosine decay to 0).
        alpha: ``"r"`` (α = r) or ``"2r"``; rslora: peft's ``use_rslora`` (scaling α/√r).
        what: what the case varies, for the report.
        batch: 1, the first held-out set; 2, the set fixed after the rule's changes of
            7 December 2026 had been made on the tuning cases (blind to them).
    """

    name: str
    model: str
    lora: tuple[str, ...]
    planted: tuple[tuple[tuple[str, ...], int], ...]
    ranks: tuple[int, ...] = (64,)
    lr: float = 1e-3
    schedule: str = "constant"
    warmup: float = 0.1
    alpha: str = "r"
    rslora: bool = False
    steps: int = 300
    what: str = ""
    batch: int = 1

    @property
    def teacher(self) -> str:
        """Cases planting the same update share a teacher."""
        kinds = "_".join(f"{'-'.join(kinds)}{k}" for kinds, k in self.planted)
        return f"{self.model}_{kinds}"

    def planted_rank(self, kind: str) -> int:
        return next((k for kinds, k in self.planted if kind in kinds), 0)

    @property
    def K(self) -> int:
        return max(k for _, k in self.planted)


HELDOUT_CASES = (
    HeldoutCase(
        "llama_qv",
        "llama",
        QV,
        ((QV, 4),),
        ranks=(2, 64),
        what="causal LM (tiny random Llama), q/v, K = 4",
    ),
    HeldoutCase(
        "llama_all",
        "llama",
        ALL_LLAMA,
        ((ALL_LLAMA, 4),),
        ranks=(2, 64),
        what="causal LM, all-linear (q,k,v,o,gate,up,down), K = 4 in every kind",
    ),
    HeldoutCase("K16_flat", "minilm", QV, ((QV, 16),), ranks=(8, 64), what="planted K = 16 (q/v)"),
    HeldoutCase(
        "AL_by_kind",
        "minilm",
        ALL_MINILM,
        ((ATTENTION, 2), (("up", "down"), 8)),
        ranks=(4, 64),
        what="all-linear, K = 2 in attention (q,k,v,o), K = 8 in the MLP (up, down)",
    ),
    HeldoutCase(
        "AL_equal",
        "minilm",
        ALL_MINILM,
        ((ALL_MINILM, 4),),
        ranks=(2, 64),
        what="all-linear, K = 4 in every kind",
    ),
    HeldoutCase("K24_flat", "minilm", QV, ((QV, 24),), ranks=(8, 64), what="planted K = 24 (q/v)"),
    HeldoutCase(
        "rslora", "minilm", QV, ((QV, 6),), rslora=True, what="rsLoRA, α = r (scaling √r = 8 at r = 64), K = 6"
    ),
    HeldoutCase("alpha_2r", "minilm", QV, ((QV, 6),), alpha="2r", what="α = 2r (scaling 2), K = 6"),
    HeldoutCase("lr_low", "minilm", QV, ((QV, 6),), lr=3.3e-4, what="lr 3.3e-4 (3× lower), K = 6"),
    HeldoutCase("lr_high", "minilm", QV, ((QV, 6),), lr=3e-3, what="lr 3e-3 (3× higher), K = 6"),
    HeldoutCase(
        "cosine",
        "minilm",
        QV,
        ((QV, 6),),
        schedule="cosine",
        what="cosine schedule, 10 % linear warm-up, peak lr 1e-3, K = 6",
    ),
    HeldoutCase("llama_qv_K8", "llama", QV, ((QV, 8),), ranks=(4, 64), batch=2, what="causal LM, q/v, K = 8"),
    HeldoutCase(
        "llama_by_kind",
        "llama",
        ALL_LLAMA,
        ((ATTENTION, 2), (MLP, 8)),
        ranks=(4, 64),
        batch=2,
        what="causal LM, all-linear, K = 2 in attention (q,k,v,o), K = 8 in the MLP (gate, up, down)",
    ),
    HeldoutCase(
        "llama_rslora",
        "llama",
        ALL_LLAMA,
        ((ALL_LLAMA, 4),),
        rslora=True,
        batch=2,
        what="causal LM, all-linear, rsLoRA (α = r), K = 4 in every kind",
    ),
    HeldoutCase("K12_flat", "minilm", QV, ((QV, 12),), ranks=(4, 64), batch=2, what="planted K = 12 (q/v)"),
    HeldoutCase("rslora_K12", "minilm", QV, ((QV, 12),), rslora=True, batch=2, what="rsLoRA, α = r, K = 12"),
    HeldoutCase("lr_low_K3", "minilm", QV, ((QV, 3),), lr=3.3e-4, batch=2, what="lr 3.3e-4 (3× lower), K = 3"),
    HeldoutCase("lr_high_K12", "minilm", QV, ((QV, 12),), lr=3e-3, batch=2, what="lr 3e-3 (3× higher), K = 12"),
    HeldoutCase(
        "alpha_2r_cosine",
        "minilm",
        QV,
        ((QV, 12),),
        alpha="2r",
        schedule="cosine",
        batch=2,
        what="α = 2r, cosine schedule (10 % linear warm-up, peak lr 1e-3), K = 12",
    ),
)
"""In the order they are trained (the cheap Llama cases first, then by what the issue most needs)."""
