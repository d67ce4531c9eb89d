"""Figures for MLflow runs (evaluation plots, the drift report's bars).

Built with matplotlib's object-oriented API on an Agg canvas: no pyplot global state, no GUI
backend, safe inside Airflow workers and threads. matplotlib is imported when a figure is made.
"""

from __future__ import annotations


def new_figure(width: float, height: float):
    """An empty ``width`` x ``height`` inch figure (100 dpi, constrained layout)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure
