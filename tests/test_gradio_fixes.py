"""ui/gradio_fixes.py: a result image in Gradio's cache is written once, whole, and never
rewritten in place while a client may be downloading it (the race tests/test_load.py found)."""

from __future__ import annotations

import threading

from PIL import Image

from ui import gradio_fixes


def test_an_image_already_in_the_cache_is_not_written_again(tmp_path):
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    first = gradio_fixes._save_pil_to_cache_atomically(image, str(tmp_path), format="png")
    before = (tmp_path / first).stat()
    again = gradio_fixes._save_pil_to_cache_atomically(image.copy(), str(tmp_path), format="png")
    after = (tmp_path / again).stat()
    assert again == first and (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not list(tmp_path.rglob("*.part"))  # no temporary file left behind


def test_readers_never_see_a_partial_file_while_others_write_the_same_image(tmp_path):
    image = Image.effect_noise((256, 256), 60).convert("RGB")
    path = gradio_fixes._save_pil_to_cache_atomically(image, str(tmp_path), format="png")
    size = len(open(path, "rb").read())
    short_reads, stop = [], threading.Event()

    def read():
        while not stop.is_set():
            data = open(path, "rb").read()
            if len(data) != size:
                short_reads.append(len(data))

    readers = [threading.Thread(target=read) for _ in range(2)]
    for reader in readers:
        reader.start()
    for _ in range(200):
        gradio_fixes._save_pil_to_cache_atomically(image, str(tmp_path), format="png")
    stop.set()
    for reader in readers:
        reader.join()
    assert short_reads == []


def test_the_app_installs_it():
    from gradio import processing_utils

    gradio_fixes.install()
    assert processing_utils.save_pil_to_cache is gradio_fixes._save_pil_to_cache_atomically
