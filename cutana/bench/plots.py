# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
PNG plots of the results of ``cutana bench`` (`cutana.bench.harness`).

Three figures are drawn from the ``results`` dictionary of
`~cutana.bench.harness.run_benchmark` (or a ``results.json`` read back):

``throughput.png``
    Cutouts per second of every tool and worker count, grouped by scenario
    (bar chart, logarithmic axis).
``scaling.png``
    Cutouts per second against the number of workers, one panel per
    scenario, with cutana's one-worker throughput times the number of
    workers (linear scaling from one worker, which may itself keep a spare
    core busy with its writing and stretching threads) and the Astropy
    baseline as a horizontal line.
``memory.png``
    Resident memory of each run's whole process tree over time, one panel
    per scenario (the layout of Figure 2 of the ESA Cutana paper).

The figures are made with `matplotlib.figure.Figure` and the Agg canvas,
so no global backend is set and no pyplot state is touched.
"""

import math
from pathlib import Path

__all__ = ["plot_memory", "plot_results", "plot_scaling", "plot_throughput"]

_COLOURS = {"astropy": "#7f7f7f", "cutana": "#1f77b4", "esa-cutana": "#d62728"}
_LABELS = {
    "astropy": "Astropy Cutout2D loop",
    "cutana": "cutana",
    "esa-cutana": "ESA Cutana",
}


def _figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _good(run):
    cps = run.get("cutouts_per_second")
    return not run.get("error") and cps is not None and math.isfinite(cps) and cps > 0


def _series(results):
    """Ordered (tool, workers) pairs present in the results."""
    keys = []
    for sc in results["scenarios"]:
        for run in sc["runs"]:
            key = (run["tool"], run["workers"])
            if key not in keys:
                keys.append(key)
    order = {"astropy": 0, "cutana": 1, "esa-cutana": 2}
    return sorted(keys, key=lambda k: (order.get(k[0], 9), k[1]))


def _label(tool, workers):
    if tool == "astropy":
        return _LABELS[tool]
    return f"{_LABELS.get(tool, tool)}, {workers} worker{'s' if workers > 1 else ''}"


def _panels(n):
    cols = min(n, 2)
    rows = max(1, math.ceil(n / cols))
    return rows, cols


def _title(results):
    return "cutana bench" + (" (quick)" if results.get("quick") else "")


def plot_throughput(results, path):
    """Draw cutouts per second by scenario, tool and worker count.

    Parameters
    ----------
    results : dict
        Results of `~cutana.bench.harness.run_benchmark`.
    path : str or path-like
        PNG file to write.

    Returns
    -------
    path : str
        The file written.

    Examples
    --------
    >>> from cutana.bench.plots import plot_throughput
    >>> plot_throughput(results, "throughput.png")  # doctest: +SKIP
    """
    import numpy as np

    scenarios = results["scenarios"]
    keys = _series(results)
    fig = _figure(max(6.0, 1.6 + 2.2 * len(scenarios)), 4.4)
    ax = fig.add_subplot()
    width = 0.8 / max(len(keys), 1)
    x = np.arange(len(scenarios))
    shades = {}
    for k, (tool, workers) in enumerate(keys):
        shades[tool] = shades.get(tool, 0) + 1
        values = []
        for sc in scenarios:
            run = next(
                (
                    r
                    for r in sc["runs"]
                    if (r["tool"], r["workers"]) == (tool, workers) and _good(r)
                ),
                None,
            )
            values.append(run["cutouts_per_second"] if run else np.nan)
        alpha = 1.0 if shades[tool] == 1 else 0.6
        hatch = None if shades[tool] == 1 else "//"
        bars = ax.bar(
            x - 0.4 + width * (k + 0.5),
            values,
            width,
            color=_COLOURS.get(tool, "k"),
            alpha=alpha,
            hatch=hatch,
            label=_label(tool, workers),
        )
        for bar, value in zip(bars, values, strict=True):
            if np.isfinite(value):
                ax.annotate(
                    f"{value:,.0f}",
                    (bar.get_x() + bar.get_width() / 2, value),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    rotation=90,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
    ax.set_yscale("log")
    ax.set_xticks(x, [sc["name"] for sc in scenarios])
    ax.set_ylabel("cutouts per second (whole run, log scale)")
    ax.set_title(f"{_title(results)}: throughput")
    ax.margins(y=0.25)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.savefig(path)
    return str(path)


def plot_scaling(results, path):
    """Draw cutouts per second against the number of workers.

    Parameters
    ----------
    results : dict
        Results of `~cutana.bench.harness.run_benchmark`.
    path : str or path-like
        PNG file to write.

    Returns
    -------
    path : str
        The file written.

    Examples
    --------
    >>> from cutana.bench.plots import plot_scaling
    >>> plot_scaling(results, "scaling.png")  # doctest: +SKIP
    """
    scenarios = results["scenarios"]
    rows, cols = _panels(len(scenarios))
    fig = _figure(4.2 * cols, 3.4 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, sc in zip(axes, scenarios, strict=False):
        workers = sorted(
            {r["workers"] for r in sc["runs"] if r["tool"] != "astropy"} or {1}
        )
        for tool in ("cutana", "esa-cutana"):
            runs = sorted(
                (r for r in sc["runs"] if r["tool"] == tool and _good(r)),
                key=lambda r: r["workers"],
            )
            if not runs:
                continue
            ax.plot(
                [r["workers"] for r in runs],
                [r["cutouts_per_second"] for r in runs],
                "o-",
                color=_COLOURS[tool],
                label=_LABELS[tool],
            )
            if tool == "cutana" and runs[0]["workers"] == 1:
                base = runs[0]["cutouts_per_second"]
                ax.plot(
                    workers,
                    [base * w for w in workers],
                    ":",
                    color=_COLOURS[tool],
                    label="cutana, 1 worker x workers",
                )
        base = next(
            (r for r in sc["runs"] if r["tool"] == "astropy" and _good(r)), None
        )
        if base is not None:
            ax.axhline(
                base["cutouts_per_second"],
                color=_COLOURS["astropy"],
                ls="--",
                label=_LABELS["astropy"],
            )
        ax.set_xticks(workers)
        ax.set_xlabel("workers")
        ax.set_ylabel("cutouts per second")
        ax.set_ylim(bottom=0)
        ax.set_title(sc["name"], fontsize=10)
        ax.legend(fontsize=7)
    for ax in axes[len(scenarios) :]:
        ax.set_visible(False)
    fig.suptitle(f"{_title(results)}: scaling with workers")
    fig.savefig(path)
    return str(path)


def plot_memory(results, path):
    """Draw the memory of each run's process tree over time.

    Parameters
    ----------
    results : dict
        Results of `~cutana.bench.harness.run_benchmark`.
    path : str or path-like
        PNG file to write.

    Returns
    -------
    path : str
        The file written.

    Examples
    --------
    >>> from cutana.bench.plots import plot_memory
    >>> plot_memory(results, "memory.png")  # doctest: +SKIP
    """
    scenarios = results["scenarios"]
    rows, cols = _panels(len(scenarios))
    fig = _figure(4.6 * cols, 3.4 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    styles = ["-", "--", ":", "-."]
    for ax, sc in zip(axes, scenarios, strict=False):
        seen = {}
        for run in sc["runs"]:
            samples = run.get("memory_samples") or []
            if not samples:
                continue
            k = seen.get(run["tool"], 0)
            seen[run["tool"]] = k + 1
            label = _label(run["tool"], run["workers"])
            if run.get("extrapolated"):
                label += f" ({run['n_cutouts']} sources)"
            ax.plot(
                [t for t, _ in samples],
                [b / 1e6 for _, b in samples],
                styles[k % len(styles)],
                color=_COLOURS.get(run["tool"], "k"),
                label=label,
                lw=1.3,
            )
        ax.set_xlabel("time since start (s)")
        ax.set_ylabel("resident memory of process tree (MB)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{sc['name']} ({sc['n_sources']:,} sources)", fontsize=10)
        ax.legend(fontsize=7)
    for ax in axes[len(scenarios) :]:
        ax.set_visible(False)
    fig.suptitle(f"{_title(results)}: memory over time")
    fig.savefig(path)
    return str(path)


def plot_results(results, out_dir):
    """Draw all plots of a benchmark run into a folder.

    Parameters
    ----------
    results : dict
        Results of `~cutana.bench.harness.run_benchmark`.
    out_dir : str or path-like
        Folder to write ``throughput.png``, ``scaling.png`` and
        ``memory.png`` into.

    Returns
    -------
    paths : list of str
        The files written (none when there are no scenarios).

    Raises
    ------
    ImportError
        If matplotlib is not installed.

    Examples
    --------
    >>> from cutana.bench.plots import plot_results
    >>> plot_results(results, "cutana-bench")  # doctest: +SKIP
    """
    import matplotlib  # noqa: F401  (a clear ImportError before any work)

    if not results.get("scenarios"):
        return []
    out_dir = Path(out_dir)
    return [
        plot_throughput(results, out_dir / "throughput.png"),
        plot_scaling(results, out_dir / "scaling.png"),
        plot_memory(results, out_dir / "memory.png"),
    ]
