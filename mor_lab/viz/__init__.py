"""Plotly figures and ipywidgets dashboards shared by every notebook: the library computes, these show it."""
from .timeline import ACTIVITY_COLORS, activity_color, utilization_timeline
from .tokens import TextLayout, lens_heatmap, text_heatmap, token_strings
from .widgets import ThresholdDashboard, exit_heatmap, show, update_exit_heatmap

__all__ = ["ACTIVITY_COLORS", "TextLayout", "ThresholdDashboard", "activity_color", "exit_heatmap", "lens_heatmap",
           "show", "text_heatmap", "token_strings", "update_exit_heatmap", "utilization_timeline"]
