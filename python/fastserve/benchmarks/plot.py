"""`fastserve bench serve --plot out.png`: TTFT, TPOT and output throughput against request
rate, one point per run of the sweep (matplotlib, an optional extra: pip install
'fastserve[plot]'). The request rates are placed evenly (categorical axis) so `inf` has a
place; latencies show p50 and p99, in milliseconds."""

from __future__ import annotations

# Width x height in pixels of the picture (figsize * dpi), fixed so it is checkable.
FIGSIZE = (15, 4.5)
DPI = 100


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'fastserve[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only; never a display
    return matplotlib


def plot_serving(result: dict, path: str) -> None:
    """Draw a `fastserve bench serve` result (its "runs") into a PNG at `path`."""
    require_matplotlib()
    import matplotlib.pyplot as plt

    runs = result["runs"]
    if not runs:
        raise ValueError("the result holds no runs to plot")
    labels = [str(r["request_rate"]) for r in runs]
    x = list(range(len(runs)))

    def series(key: str, stat: str) -> list[float]:
        return [float("nan") if r[key][stat] is None else r[key][stat] * 1000 for r in runs]

    fig, axes = plt.subplots(1, 3, figsize=FIGSIZE, dpi=DPI)
    for ax, key, title in ((axes[0], "ttft_s", "Time to first token"), (axes[1], "tpot_s", "Time per output token")):
        ax.plot(x, series(key, "p50"), marker="o", label="p50")
        ax.plot(x, series(key, "p99"), marker="s", linestyle="--", label="p99")
        ax.set_title(title)
        ax.set_ylabel("ms")
        ax.legend()
    axes[2].plot(x, [r["output_token_throughput"] for r in runs], marker="o", color="tab:green")
    axes[2].set_title("Output throughput")
    axes[2].set_ylabel("tokens/s")
    for ax in axes:
        ax.set_xticks(x, labels)
        ax.set_xlabel("request rate (req/s)")
        ax.grid(True, alpha=0.3)
    model = result.get("model", "")
    fig.suptitle(
        f"fastserve bench serve: {model} ({result.get('dataset', 'random')}, "
        f"{result.get('num_prompts')} requests per rate)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
