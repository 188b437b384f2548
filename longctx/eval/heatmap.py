"""The depth x length heatmap users know from gkamradt's test: red (0) - yellow - green (1)."""

from __future__ import annotations

from pathlib import Path

from longctx.units import length_label

# gkamradt's LLMTest_NeedleInAHaystack colours (also EasyContext's)
COLOURS = ["#F0496E", "#EBB839", "#0CD79F"]


def plot_heatmap(
    scores: dict[tuple[int, float], float], path: str | Path, *, title: str, lengths: list[int], depths: list[float],
    row_labels: list[str] | None = None, ylabel: str = "Needle depth (%)", percent: bool = False,
) -> Path:
    """Write a PNG of the mean score of each (length, depth) cell; missing cells are left blank.
    Rows are depths, or anything else named by `row_labels` (RULER's tasks); `percent` writes the
    scores (still 0-1) in each cell as points out of 100."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap

    grid = np.full((len(depths), len(lengths)), np.nan)
    for row, depth in enumerate(depths):
        for column, length in enumerate(lengths):
            if (length, depth) in scores:
                grid[row, column] = scores[(length, depth)]
    width = min(18.0, max(8.0, 2.5 + 0.9 * len(lengths)))
    height = min(10.0, 2.2 + 0.45 * len(depths))
    figure, axes = plt.subplots(figsize=(width, height), dpi=100)
    cmap = LinearSegmentedColormap.from_list("needle", COLOURS)
    image = axes.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for row in range(len(depths)):
        for column in range(len(lengths)):
            if not np.isnan(grid[row, column]):
                value = grid[row, column]
                text = f"{100 * value:.1f}" if percent else f"{value:.2f}"
                axes.text(column, row, text, ha="center", va="center", fontsize=9, color="black")
    axes.set_xticks(range(len(lengths)), [length_label(length) for length in lengths])
    axes.set_yticks(range(len(depths)), row_labels or [f"{depth:g}" for depth in depths])
    axes.set_xlabel("Context length (tokens)")
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    figure.colorbar(image, ax=axes, label="Score", fraction=0.046, pad=0.04)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path
