"""Work-arounds for defects of the Gradio version we pin, installed once by `app.build_app`.

Result images written to Gradio's cache, atomically.  Gradio names a result image's cache file
after a hash of its bytes and writes it in place (`processing_utils.save_pil_to_cache`), so when
two requests return the same image (the same seed, or the "before" image every removal returns)
the second write truncates the file while the first client is still downloading it: under load
(tests/test_load.py, 16 clients) a client now and then got an empty or cut-short PNG.  Here a file
of that name is never rewritten (same name, same bytes), and a new one appears complete, written
to a temporary name and renamed into place.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _save_pil_to_cache_atomically(img, cache_dir: str, name: str = "image", format: str = "webp") -> str:
    from gradio import processing_utils

    data = processing_utils.encode_pil_to_bytes(img, format)
    folder = Path(cache_dir) / processing_utils.hash_bytes(data)
    folder.mkdir(exist_ok=True, parents=True)
    target = (folder / f"{name}.{format}").resolve()
    if target.is_file() and target.stat().st_size == len(data):
        return str(target)  # named after its bytes: already there, complete
    handle, staging = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(staging, target)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return str(target)


def install() -> None:
    """Install the work-arounds (idempotent)."""
    from gradio import processing_utils

    processing_utils.save_pil_to_cache = _save_pil_to_cache_atomically
