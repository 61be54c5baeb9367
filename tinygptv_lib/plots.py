"""Small pictures the notebooks share: images back from CLIP normalisation, grids, parameter bars.

Every function returns a matplotlib Figure and keeps figures small (the notebooks are committed
with their outputs). matplotlib is imported lazily so that the package imports without it.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .data.images import CLIP_MEAN, CLIP_STD

FROZEN, TRAINABLE = "#9aa5b1", "#d9534f"  # the same two colours in every parameter picture


def to_image(pixels: torch.Tensor) -> np.ndarray:
    """A normalised image tensor (3, H, W) -> an (H, W, 3) array in [0, 1] for `imshow`."""
    if pixels.dim() != 3 or pixels.shape[0] != 3:
        raise ValueError(f"expected one image of shape (3, H, W), got {tuple(pixels.shape)}")
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (pixels.detach().float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _grid(n: int, ncols: int | None, size: float, dpi: int):
    import matplotlib.pyplot as plt

    ncols = min(n, ncols or n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), dpi=dpi, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    return fig, list(axes.flat)


def show_images(images, titles=None, ncols: int | None = None, size: float = 2.0, dpi: int = 72):
    """Images (PIL, HxWx3 arrays or normalised (3, H, W) tensors) side by side, with titles."""
    images = list(images)
    fig, axes = _grid(len(images), ncols, size, dpi)
    for i, img in enumerate(images):
        if isinstance(img, torch.Tensor):
            img = to_image(img)
        axes[i].imshow(img)
        if titles is not None:
            axes[i].set_title(titles[i], fontsize=8)
    fig.tight_layout()
    return fig


def heatmap_grid(maps, titles=None, ncols: int = 8, size: float = 0.8, image=None, cmap: str = "magma",
                 alpha: float = 0.6, dpi: int = 72):
    """A grid of small heatmaps (each 2-D), optionally laid over an image of the same extent.

    Each map keeps its own colour scale: the picture shows *where* a map is high, not how high.
    """
    maps = [m.detach().float().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m) for m in maps]
    if isinstance(image, torch.Tensor):
        image = to_image(image)
    elif image is not None:
        image = np.asarray(image)
    fig, axes = _grid(len(maps), ncols, size, dpi)
    for i, m in enumerate(maps):
        ax = axes[i]
        if image is not None:
            h, w = image.shape[:2]
            ax.imshow(image)
            ax.imshow(m, cmap=cmap, alpha=alpha, extent=(0, w, h, 0), interpolation="nearest")
        else:
            ax.imshow(m, cmap=cmap, interpolation="nearest")
        if titles is not None:
            ax.set_title(titles[i], fontsize=7, pad=2)
    fig.tight_layout(pad=0.3)
    return fig


def parameter_bars(counts: dict, title: str = "", ax=None, log: bool = True, legend: bool = True,
                   figsize=(6, 3), dpi: int = 72):
    """Frozen vs trainable parameters as horizontal bars, one pair per row.

    `counts` maps a row label to {"total": n, "trainable": n}: the output of
    `model.summary.parameter_counts(model)`, or one entry per stage.
    """
    import matplotlib.pyplot as plt

    labels = list(counts)
    trainable = np.array([counts[k]["trainable"] for k in labels], dtype=float)
    frozen = np.array([counts[k]["total"] for k in labels], dtype=float) - trainable
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize, dpi=dpi)
    else:
        fig = ax.figure
    y = np.arange(len(labels))
    ax.barh(y - 0.2, frozen, height=0.4, color=FROZEN, label="frozen")
    ax.barh(y + 0.2, trainable, height=0.4, color=TRAINABLE, label="trainable")
    ax.set_yticks(y, labels, fontsize=8)
    if not ax.yaxis_inverted():  # axes that share y with an earlier call are inverted already
        ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
        ax.set_xlim(left=1)
    ax.set_xlabel("parameters" + (" (log scale)" if log else ""), fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(title, fontsize=9)
    if legend:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


SEQUENCE_KINDS = {  # what each position of a training sequence holds, and its colour
    "BOS": "#333333", "image slot": "#f0ad4e", "prompt text": "#5bc0de", "answer (target)": "#d9534f",
    "padding": "#eeeeee",
}


def sequence_kinds(batch) -> torch.Tensor:
    """(B, T) codes into SEQUENCE_KINDS for a `model.sequence.TextBatch`: which position is what."""
    from .model.sequence import IGNORE, IMAGE_SLOT

    kinds = torch.full(batch.input_ids.shape, 2)                 # prompt text unless found otherwise
    kinds[batch.targets != IGNORE] = 3
    kinds[batch.input_ids == IMAGE_SLOT] = 1
    kinds[:, 0] = 0                                               # row starts are BOS (right padding)
    kinds[batch.attention_mask == 0] = 4
    return kinds


def sequence_layout(batch, titles=None, figsize=(7, 1.6), dpi: int = 72):
    """One coloured strip per sample: BOS, image slots, prompt, answer (= the loss targets), padding."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    kinds = sequence_kinds(batch).numpy()
    fig, ax = plt.subplots(figsize=figsize, dpi=dpi)
    ax.imshow(kinds, cmap=ListedColormap(list(SEQUENCE_KINDS.values())), vmin=0, vmax=len(SEQUENCE_KINDS) - 1,
              aspect="auto", interpolation="nearest")
    ax.set_yticks(range(kinds.shape[0]), titles if titles is not None else [f"sample {i}" for i in range(kinds.shape[0])],
                  fontsize=8)
    ax.set_xticks(np.arange(-0.5, kinds.shape[1], 1), minor=True)
    ax.grid(which="minor", axis="x", color="white", lw=0.5)
    ax.tick_params(which="minor", length=0)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("position", fontsize=8)
    ax.legend(handles=[Patch(color=c, label=k) for k, c in SEQUENCE_KINDS.items()], fontsize=7, ncol=5,
              loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- training pictures


def read_metrics(path) -> list[dict]:
    """The rows of a stage's `metrics.jsonl` (one dict per step: step, loss, lr, ...)."""
    import json
    from pathlib import Path

    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def moving_average(values, window: int) -> np.ndarray:
    """Trailing mean over at most `window` values (shorter at the start), as long as `values`."""
    v = np.asarray(values, dtype=float)
    if window <= 1 or len(v) == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def loss_curves(runs: dict, smooth: int = 10, together: bool = False, ncols: int | None = None,
                figsize=(6, 3), dpi: int = 72, sharey: bool = False):
    """Training loss per run: each step (thin) and a trailing mean over `smooth` steps (thick).

    `runs` maps a title to a metrics.jsonl path or its rows. One panel per run, or with
    `together=True` one panel with the runs one after another along the x axis (a stage's steps
    continue where the previous stage's ended), split by dotted lines.
    """
    import matplotlib.pyplot as plt

    rows = {k: (read_metrics(v) if not isinstance(v, list) else v) for k, v in runs.items()}
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if together:
        fig, ax = plt.subplots(figsize=figsize, dpi=dpi)
        axes, start = [ax] * len(rows), 0
    else:
        n = len(rows)
        ncols = min(n, ncols or n)
        nrows = math.ceil(n / ncols)
        fig, grid = plt.subplots(nrows, ncols, figsize=figsize, dpi=dpi, squeeze=False, sharey=sharey)
        axes = list(grid.flat)
        for ax in axes[n:]:
            ax.set_axis_off()
        start = 0
    for k, (title, rs) in enumerate(rows.items()):
        ax, colour = axes[k], colours[k % len(colours)]
        steps = np.array([r["step"] for r in rs], dtype=float) + (start if together else 0)
        loss = np.array([r["loss"] for r in rs], dtype=float)
        ax.plot(steps, loss, lw=0.6, alpha=0.35, color=colour)
        ax.plot(steps, moving_average(loss, smooth), lw=1.8, color=colour, label=title)
        if together:
            if k:
                ax.axvline(start - 0.5, color="#888888", lw=0.8, ls=":")
            start += len(rs)
        else:
            ax.set_title(title, fontsize=9)
        ax.set_xlabel("global step" if together else "step", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
        ax.tick_params(labelsize=7)
    if together:
        axes[0].legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def share_bars(labels, expected, observed, names=("configured", "sampled"), title: str = "",
               figsize=(6, 3), dpi: int = 72):
    """Two shares per label (each list is normalised to sum to 1) as paired horizontal bars, e.g.
    a mixture's configured ratio beside the share a sampler actually drew."""
    import matplotlib.pyplot as plt

    e = np.asarray(expected, dtype=float)
    o = np.asarray(observed, dtype=float)
    e, o = e / e.sum(), o / o.sum()
    y = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=figsize, dpi=dpi)
    ax.barh(y - 0.2, e, height=0.4, color=FROZEN, label=names[0])
    ax.barh(y + 0.2, o, height=0.4, color=TRAINABLE, label=names[1])
    ax.set_yticks(y, list(labels), fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("share", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    fig.tight_layout()
    return fig


def image_with_text(image, text: str, title: str = "", width: int = 44, figsize=(6, 3), dpi: int = 72):
    """An image (PIL, array or normalised tensor) on the left and a wrapped text beside it."""
    import textwrap

    import matplotlib.pyplot as plt

    if isinstance(image, torch.Tensor):
        image = to_image(image)
    fig, (ax_img, ax_txt) = plt.subplots(1, 2, figsize=figsize, dpi=dpi, gridspec_kw={"width_ratios": [1, 1.3]})
    ax_img.imshow(image)
    ax_img.set_axis_off()
    if title:
        ax_img.set_title(title, fontsize=9)
    ax_txt.set_axis_off()
    wrapped = "\n\n".join(textwrap.fill(p, width) for p in str(text).split("\n") if p.strip())
    ax_txt.text(0, 1, wrapped, va="top", ha="left", fontsize=8, family="monospace", transform=ax_txt.transAxes)
    fig.tight_layout()
    return fig
