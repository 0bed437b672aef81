"""Task modules: one per tab, plus the model registry (models.py) and I/O helpers."""
