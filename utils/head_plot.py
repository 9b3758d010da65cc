"""The per-head figures of the report (utils/head_analysis.py's numbers): a layer x head heat map of
each region's mean mass and one of the heads' classes. matplotlib draws off-screen (Agg)."""
import matplotlib
import torch

from utils.head_analysis import REGIONS
from utils.head_classes import HEAD_CLASSES

matplotlib.use("Agg")  # before pyplot is imported: no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

CLASS_COLORS = ("tab:purple", "tab:orange", "0.85")  # sink, local, spread
REGION_TITLES = {"sink": "mass on the sink frames", "current": "mass on the current block", "rest": "mass on the rest"}


def _axes_labels(ax, layers, heads):
    """Layers and heads numbered as heads.csv and --panels number them (0-based)."""
    ax.set_xticks(range(heads), [str(h) for h in range(heads)], fontsize=6 if heads > 12 else 8)
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=6 if len(layers) > 12 else 8)
    ax.set_xlabel("Head (0-based)")
    ax.set_ylabel("Layer (0-based)")


def head_heatmaps(groups, title):
    """One (block, pass) of one setting: ``groups`` its head_statistics groups, one per layer. Three heat
    maps (layer x head, mean mass of each region over items, 0..1) and the class map."""
    layers = [g["layer_idx"] for g in groups]
    heads = len(groups[0]["classes"])
    fig, axes = plt.subplots(1, 4, figsize=(max(14, 1.3 * heads + 6), 0.35 * len(layers) + 2.2), squeeze=False)
    annotate = len(layers) * heads <= 160
    for ax, region in zip(axes[0], REGIONS):
        image = torch.stack([g["heads"][region]["mean"] for g in groups]).float()  # [layers, heads]
        shown = ax.imshow(image.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        if annotate:
            for (row, col), value in zip(torch.cartesian_prod(torch.arange(len(layers)), torch.arange(heads)).tolist(),
                                         image.flatten().tolist()):
                ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if value > 0.6 else "white")
        _axes_labels(ax, layers, heads)
        ax.set_title(REGION_TITLES[region], fontsize=9)
        fig.colorbar(shown, ax=ax, fraction=0.05)
    codes = torch.tensor([[HEAD_CLASSES.index(c) for c in g["classes"]] for g in groups])
    ax = axes[0, 3]
    ax.imshow(codes.numpy(), cmap=ListedColormap(CLASS_COLORS), vmin=-0.5, vmax=len(HEAD_CLASSES) - 0.5, aspect="auto",
              origin="lower")
    _axes_labels(ax, layers, heads)
    ax.set_title("class", fontsize=9)
    ax.legend(handles=[Patch(color=c, label=f"{k} head") for k, c in zip(HEAD_CLASSES, CLASS_COLORS)],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
