"""Pictures of one main.py run, written as PNGs beside its pruning_info.json.

    python scripts/plot_run.py output/<run>

Pruning runs (layerwise / progressive / random / frequency / REAP):
- experts.png: kept and dropped experts, one row per MoE layer, one column per expert.
- losses.png (search methods): every scored candidate drop set's loss divided by the chosen set's
  loss, sorted, one line per layer: a line that rises at once is a sharp choice, a flat one a
  near-tie. scores.png (baselines): the per-expert scores, sorted, each layer's divided by its
  largest, with the cut after the r kept experts.
Dynamic skipping runs:
- betas.png: beta (the median w_j/w_1 at calibration, so by construction about half of the
  calibration tokens skip) and the mean ratio per layer; a second panel with the skip rate per layer
  where the run recorded one ("skip_rate" in a layer's entry).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


class RunError(ValueError):
    """Not a run folder this script can draw; reported as one line."""


def read_run(folder: Path) -> dict:
    info = folder / "pruning_info.json"
    if not info.is_file():
        raise RunError(f"{folder} has no pruning_info.json; pass a result folder written by main.py")
    try:
        record = json.loads(info.read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{info} is not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("layers"), dict) or not record["layers"]:
        raise RunError(f"{info} has no per-layer results ('layers'); pass a result folder written by main.py")
    return record


def ordered(layers: dict) -> list[tuple[int, dict]]:
    return sorted(((int(k), v) for k, v in layers.items()), key=lambda kv: kv[0])


def kept_grid(layers: dict) -> tuple[list[int], np.ndarray]:
    """(layer indices, (layers, n_experts) array: 1 kept, 0 dropped)."""
    rows = ordered(layers)
    n = max(len(v["kept_experts"]) + len(v["dropped_experts"]) for _, v in rows)
    grid = np.zeros((len(rows), n))
    for i, (_, v) in enumerate(rows):
        grid[i, v["kept_experts"]] = 1
    return [idx for idx, _ in rows], grid


def title(record: dict) -> str:
    a = record.get("args", {})
    r = f" r={a['r']}" if a.get("r") is not None else ""
    return f"{Path(str(a.get('model_path', '?'))).name}: {a.get('method', '?')}{r}, calibration {a.get('calib_set', '?')}"


def plot_experts(record: dict, path: Path) -> None:
    idx, grid = kept_grid(record["layers"])
    fig, ax = plt.subplots(figsize=(min(16, max(6.5, 2.5 + 0.35 * grid.shape[1])), min(12, 1.8 + 0.35 * grid.shape[0])))
    ax.imshow(grid, cmap=matplotlib.colors.ListedColormap(["#d9d9d9", "#2166ac"]), vmin=0, vmax=1, aspect="auto",
              interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(len(idx)), [str(i) for i in idx])
    if grid.shape[1] <= 32:
        ax.set_xticks(range(grid.shape[1]))
    ax.set_xticks(np.arange(-0.5, grid.shape[1]), minor=True)
    ax.set_yticks(np.arange(-0.5, grid.shape[0]), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    ax.legend(handles=[matplotlib.patches.Patch(color="#2166ac", label="kept"),
                       matplotlib.patches.Patch(color="#d9d9d9", label="dropped")],
              loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title(record), fontsize=10)
    save(fig, path)


def ranked_curves(record: dict, field: str, descending: bool, label, dense_marker_limit: int | None = None):
    """A new figure with one curve per layer: the layer's `field` values sorted best first (descending or
    ascending) and divided by the best one (by 1 when it is 0: a zero loss, keeping all, would divide by
    zero). label(layer index, layer record, number of values) names each curve. Returns fig, ax, layers."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = ordered(record["layers"])
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(rows)))
    for (idx, v), c in zip(rows, colors):
        values = np.sort(np.array(list(v[field].values()), dtype=np.float64))
        values = values[::-1] if descending else values
        best = values[0] if values[0] > 0 else 1.0
        marker = "." if dense_marker_limit is None or len(values) <= dense_marker_limit else None
        ax.plot(np.arange(1, len(values) + 1), values / best, marker=marker, color=c, label=label(idx, v, len(values)))
    return fig, ax, rows


def plot_losses(record: dict, path: Path) -> None:
    fig, ax, _ = ranked_curves(record, "loss", descending=False, dense_marker_limit=64,
                               label=lambda idx, v, n: f"layer {idx} ({v.get('search', '?')}, {n} scored)")
    ax.set_xscale("log")
    ax.set_xlabel("candidate drop set, by loss (rank)")
    ax.set_ylabel("loss / chosen set's loss")
    ax.set_title(title(record) + "\nhow sharp the choice is", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save(fig, path)


def plot_scores(record: dict, path: Path) -> None:
    fig, ax, rows = ranked_curves(record, "scores", descending=True, label=lambda idx, v, n: f"layer {idx}")
    r = len(rows[0][1]["kept_experts"])
    ax.axvline(r + 0.5, color="k", linestyle="--", linewidth=1, label=f"kept | dropped (r={r})")
    ax.set_xlabel("expert, by score (rank)")
    ax.set_ylabel("score / layer's largest score")
    ax.set_title(title(record) + f"\nper-expert scores ({rows[0][1].get('search', '?')})", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save(fig, path)


def plot_betas(record: dict, path: Path) -> None:
    rows = ordered(record["layers"])
    idx = [i for i, _ in rows]
    median = np.array([np.atleast_1d(v["beta_median"]) for _, v in rows], dtype=np.float64)  # (layers, k - 1)
    mean = np.array([np.atleast_1d(v["beta_mean"]) for _, v in rows], dtype=np.float64)
    rates = [v.get("skip_rate") for _, v in rows]
    has_rates = all(r is not None for r in rates)
    fig, axes = plt.subplots(1, 2 if has_rates else 1, figsize=(11 if has_rates else 6.5, 4.2), squeeze=False)
    ax = axes[0, 0]
    for j in range(median.shape[1]):
        rank = f" (rank {j + 2})" if median.shape[1] > 1 else ""
        ax.plot(idx, median[:, j], marker="o", label=f"beta = median w{j + 2}/w1{rank}")
        ax.plot(idx, mean[:, j], marker="x", linestyle=":", label=f"mean w{j + 2}/w1{rank}")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("routing-weight ratio")
    ax.set_xticks(idx)
    ax.legend(fontsize=8)
    ax.set_title("betas per layer (calibration skip rate = 0.5 by construction)", fontsize=9)
    if has_rates:
        ax = axes[0, 1]
        ax.bar(idx, rates, color="#2166ac")
        ax.set_ylim(0, 1)
        ax.set_xticks(idx)
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("skip rate")
        ax.set_title("recorded skip rate per layer", fontsize=9)
    fig.suptitle(title(record), fontsize=10)
    save(fig, path)


def save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_run(folder: Path) -> list[Path]:
    """Draw every picture that applies to the run in `folder`; returns the files written."""
    record = read_run(folder)
    layers = list(record["layers"].values())
    written = []
    if all("kept_experts" in v for v in layers):
        written.append(folder / "experts.png")
        plot_experts(record, written[-1])
        if all(v.get("loss") for v in layers):
            written.append(folder / "losses.png")
            plot_losses(record, written[-1])
        elif all(v.get("scores") for v in layers):
            written.append(folder / "scores.png")
            plot_scores(record, written[-1])
    elif all("beta_median" in v for v in layers):
        written.append(folder / "betas.png")
        plot_betas(record, written[-1])
    else:
        raise RunError(f"{folder / 'pruning_info.json'}: layers hold neither kept experts nor betas; "
                       f"pass a result folder written by main.py")
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a result folder written by main.py (holds pruning_info.json)")
    args = p.parse_args(argv)
    try:
        written = plot_run(Path(args.run))
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
