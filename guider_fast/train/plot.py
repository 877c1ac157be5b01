"""``--plot PATH.png``: the training curves of a ``train`` result, drawn with matplotlib.

matplotlib is an optional extra (``pip install 'guider_fast[plot]'``) and is imported only
here, when a plot is asked for; without it ``plot_history`` writes nothing and says so.
"""

from __future__ import annotations

from typing import Dict

INSTALL_HINT = "pip install 'guider_fast[plot]'"


def plot_history(result: Dict, path: str) -> str:
    """Draws ``result["history"]`` into the PNG ``path``: the training loss per epoch, validation
    Recall@20 / NDCG@20 per evaluation and, for GUIDER, the share of rows flagged noisy per epoch
    (with precision and recall against the planted truth when known).  Returns the line to log."""
    try:
        import matplotlib
    except ImportError:
        return f"--plot: matplotlib is not installed ({INSTALL_HINT}); no plot written to {path}"
    matplotlib.use("Agg", force=True)  # files only: no display needed
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    history = result["history"]
    flagged = [r for r in history if "flags" in r]
    panels = 3 if flagged else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8), constrained_layout=True)
    epochs = [r["epoch"] for r in history]
    axes[0].plot(epochs, [r["loss"] for r in history], marker=".")
    axes[0].set(title="training loss", xlabel="epoch", ylabel="mean loss")
    evaluated = [r for r in history if "valid" in r]
    for metric in ("recall@20", "ndcg@20"):
        axes[1].plot([r["epoch"] for r in evaluated], [r["valid"][metric] for r in evaluated], marker=".",
                     label=f"valid {metric}")
    best = result.get("best_epoch")
    if best:
        axes[1].axvline(best, color="grey", linestyle=":", label=f"best epoch {best}")
    axes[1].set(title="validation", xlabel="epoch")
    axes[1].legend()
    if flagged:
        x = [r["epoch"] for r in flagged]
        for key, label in (("flagged_share", "flagged share"), ("precision", "precision vs planted"),
                           ("recall", "recall vs planted")):
            if key in flagged[0]["flags"]:
                axes[2].plot(x, [r["flags"][key] for r in flagged], marker=".", label=label)
        planted = (result.get("noise_detection") or {}).get("planted_share")
        if planted is not None:
            axes[2].axhline(planted, color="grey", linestyle=":", label=f"planted share {planted:.0%}")
        axes[2].set(title="calibration flags (noisy)", xlabel="epoch", ylim=(-0.02, 1.02))
        axes[2].legend()
    for axis in axes:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(result.get("data", "").split(":")[0])
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"training curves written to {path}"
