"""Task modules: one per tab, plus the model registry (models.py) and I/O helpers (io.py)."""

import logging


class _NoTorchvisionNotice(logging.Filter):
    """Drop transformers' notice that image processors fall back to PIL without torchvision.

    We never install torchvision (it replaces the CPU torch build with a multi-GB one) and the
    PIL image processors are what we want, so the notice printed on every run is only noise.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


# filters act on the logger a record is created on: the one of transformers' lazy importer
logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionNotice())
