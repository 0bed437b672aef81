"""Work-arounds for defects of the Gradio version we pin, installed once by `app.build_app`.

Result images written to Gradio's cache, atomically.  Gradio names a result image's cache file
after a hash of its bytes and writes it in place (`processing_utils.save_pil_to_cache`), so when
two requests return the same image (the same seed, or the "before" image every removal returns)
the second write truncates the file while the first client is still downloading it: under load
(tests/test_load.py, 16 clients) a client now and then got an empty or cut-short PNG.  Here a file
of that name is never rewritten (same name, same bytes), and a new one appears complete, written
to a temporary name and renamed into place.

Results returned from the results folder.  Gradio refuses to return a file outside the working
directory, the temp folder and `allowed_paths`; the results folder (ui/results.py) is usually in
the user's data directory, and adding it to `allowed_paths` would let `file=` serve all of it.
`allow_results_from` allows it for the copy of a handler's output into Gradio's cache only.
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


#: folders whose files a handler may return (the results folder, ui/results.py)
_RESULT_ROOTS: list[Path] = []


def _check_allowed_with_results(path, check_in_upload_folder: bool):
    """Gradio copies a returned file into its cache only when it lies in the working directory,
    the system's temp folder or `allowed_paths`; but `allowed_paths` would also let `file=` serve
    the whole results folder to anyone who names a path.  So results are allowed here, for this
    copy only (`check_in_upload_folder` False: a handler's output, never a request's input)."""
    from gradio import utils

    if not check_in_upload_folder and any(utils.is_in_or_equal(utils.abspath(path), root) for root in _RESULT_ROOTS):
        return
    return _original_check_allowed(path, check_in_upload_folder)


_original_check_allowed = None


def allow_results_from(root: str | Path) -> None:
    """Let handlers return files from `root` (see `_check_allowed_with_results`)."""
    root = Path(root).resolve()
    if root not in _RESULT_ROOTS:
        _RESULT_ROOTS.append(root)


def install() -> None:
    """Install the work-arounds (idempotent)."""
    from gradio import processing_utils

    global _original_check_allowed

    processing_utils.save_pil_to_cache = _save_pil_to_cache_atomically
    if _original_check_allowed is None:
        _original_check_allowed = processing_utils._check_allowed
        processing_utils._check_allowed = _check_allowed_with_results
