"""The figure: the package's suggestion over training against the truth k*, each case."""

from __future__ import annotations

from .cases import Settings
from .scoring import big_runs, kind_of


def draw_figure(results: dict, truths: dict, settings: Settings, path: str) -> None:
    """The package's suggestion over training vs the truth: a panel per case, the r = 64 runs'
    suggestions (seed 0 with its likely range as a band, the other seeds as thin lines), k* and
    the target band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    cases = list(results["cases"])
    cols = min(4, len(cases))
    rows = -(-len(cases) // cols)
    legend_rows = 1 if cols >= 3 else 2
    height = 3.2 * rows + 0.6 + 0.25 * legend_rows
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, height), squeeze=False)
    for ax in axes.flat[len(cases) :]:
        ax.axis("off")
    if len(cases) < axes.size:
        axes.flat[len(cases)].text(
            0.02,
            0.5,
            "How to read a panel: one task. The blue line is the rank\n"
            "lora_monitor suggests from one r = 64 run, read at that\n"
            "point of training (its probe and ΔW's spectral gaps), the\n"
            "band its likely range; orange: the same task's other seeds.\n"
            "The dashed line is the truth k*: the knee of the held-out\n"
            "loss of the trained adapters cut to k directions. Green:\n"
            "the target, at least k* and at most twice it (the example\n"
            "task: within a factor 2 of k*).",
            fontsize=8.5,
            va="center",
            transform=axes.flat[len(cases)].transAxes,
        )
    nan = float("nan")
    target = "target (planted [k*, 2k*], example [k*/2, 2k*])"
    seed0, others = "suggestion (seed 0)", "suggestion (other seeds)"
    for ax, cname in zip(axes.flat, cases):
        k = truths[cname]["k_star"]
        ax.axhspan(
            k / 2 if kind_of(cname) == "example" else k, 2 * k, color="tab:green", alpha=0.15, lw=0, label=target
        )
        ax.axhline(k, color="k", lw=1.2, ls="--", label="truth k*")
        for rname, run in big_runs(results["cases"][cname], settings):
            points = sorted((100 * float(f), p) for f, p in run["package"].items())
            xs = [x for x, _ in points]
            ys = [nan if p["rank"] is None else p["rank"] for _, p in points]
            if rname.endswith("_s0"):
                low = [nan if p["low"] is None else p["low"] for _, p in points]
                high = [nan if p["high"] is None else p["high"] for _, p in points]
                ax.fill_between(xs, low, high, color="C0", alpha=0.25, lw=0, label="likely range (seed 0)")
                ax.plot(xs, ys, color="C0", marker="o", ms=3.5, lw=1.6, label=seed0, zorder=3)
            else:
                ax.plot(xs, ys, color="C1", lw=0.9, ls=":", marker=".", ms=3, label=others)
        ax.set_yscale("log", base=2)
        ax.set_ylim(0.8, 80)
        ax.yaxis.set_major_locator(FixedLocator([1, 2, 4, 8, 16, 32, 64]))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_yticklabels(["1", "2", "4", "8", "16", "32", "64"])
        ax.set_xlim(0, 100)
        ax.set_title(f"{cname} (k* = {k})", fontsize=10)
        ax.set_xlabel("% of training", fontsize=9)
        ax.grid(alpha=0.3, lw=0.5)
    for row in axes:
        row[0].set_ylabel("LoRA rank")
    handles = dict(zip(*reversed(axes.flat[0].get_legend_handles_labels())))
    order = [label for label in (seed0, "likely range (seed 0)", others, "truth k*", target) if label in handles]
    fig.legend(
        [handles[label] for label in order],
        order,
        loc="lower center",
        ncol=5 if legend_rows == 1 else 3,
        fontsize=8,
        frameon=False,
    )
    fig.suptitle(
        f"lora_monitor's rank suggestion over training vs the truth (r = {settings.big_rank} runs of MiniLM)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, (0.1 + 0.25 * legend_rows) / height, 1, 1))
    fig.savefig(path, dpi=130)
    print(f"figure: {path}")
