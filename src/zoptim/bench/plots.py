"""PNG plots of a benchmark: dev accuracy against queries and against wall time (a reward
task's dev reward against generations and wall time), one line per method and seed
(matplotlib, without a display)."""

from __future__ import annotations

from pathlib import Path

from zoptim.bench.figures import Curve


def accuracy_plots(curves: dict[str, dict[int, Curve]], folder: Path,
                   reward: bool = False) -> list[Path]:
    """Dev accuracy against queries and wall time; for a reward task (``reward``), the greedy
    dev reward against generations and wall time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    cost = ("generations", "generations (completions decoded)") if reward else \
        ("queries", "queries (forward evaluations)")
    what = "reward" if reward else "dev"
    for axis, xlabel in (cost, ("seconds", "wall time (s)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (label, by_seed) in enumerate(curves.items()):
            # ten colours, then the same ten dashed: more than ten methods stay apart
            color, style = f"C{i % 10}", ("-", "--", ":")[i // 10 % 3]
            for j, (seed, c) in enumerate(sorted(by_seed.items())):
                x = getattr(c, axis)
                ax.plot(x, c.dev, color=color, linestyle=style, alpha=0.8, marker=".",
                        label=label if j == 0 else None)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("dev reward (greedy)" if reward else "dev accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = folder / f"{what}_vs_{axis}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
