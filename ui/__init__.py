"""Gradio building blocks for app.py: one module per tab plus shared helpers.

Only app.py imports this package; it imports `pipelines/` and Gradio, never `attention_processors/`.
"""
