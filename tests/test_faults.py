"""Faults (issue #17, item 4), each provoked for real where a CPU can do it (docs/reliability.md):

- out of memory: one sentence saying what ran out and what to lower; the failed call's memory is
  freed and the server goes on serving (an OOM injected into a running request of the in-process
  app); a real CPU allocation failure (RLIMIT_AS) in the CLI is `error: <sentence>`, status 2;
- a full disk: a real write failure (RLIMIT_FSIZE makes writes past the limit fail with EFBIG, as
  a full disk fails them with ENOSPC) keeps the previous checkpoint, learned file, result PNG and
  video byte for byte, leaves no temporary file and says so in one sentence;
- a killed process (SIGKILL): a personalization training loses at most the step it was in and the
  next start resumes it, ending bit-identical to an uninterrupted run; a folder command skips what
  it finished and makes the rest, identical to an uninterrupted run; the temporary files a kill
  leaves behind neither break nor confuse the next run.

The subprocesses run torch on one thread (OMP_NUM_THREADS=1) and the in-process reference runs do
too (`one_thread`), so that results can be compared bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

try:
    import resource
except ImportError:  # not on Windows
    resource = None

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from app_server import assert_one_clean_sentence, assert_user_error, free_port  # noqa: E402
from pipelines.errors import out_of_memory_message  # noqa: E402

ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                  "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}

CUDA_OOM = ("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.11 GiB of which "
            "1.2 GiB is free.")


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _app(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "app.py"), *args]


def _run(args: list[str], cwd: Path, timeout: float = 240, **options) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **ONE_THREAD_ENV}, **options)


def _in_process(*argv: str) -> int:
    """`python app.py ARGV` in this process (the models stay cached across tests): exit status."""
    import app

    try:
        return app.main(list(argv))
    except SystemExit as exit_:
        return exit_.code


def _hidden(folder: Path) -> set[str]:
    """The temporary files (".<stem>.<random><suffix>", pipelines.io.atomic_path) in `folder`."""
    return {path.name for path in folder.iterdir() if path.name.startswith(".")}


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).copy()


# ================================================================================ out of memory


def test_out_of_memory_is_one_sentence_saying_what_ran_out_and_what_to_lower():
    gpu = out_of_memory_message(torch.OutOfMemoryError(CUDA_OOM))
    assert gpu.startswith("The GPU ran out of memory while allocating 20.0 GiB:"), gpu
    mps = out_of_memory_message(RuntimeError("MPS backend out of memory (MPS allocated: 8.1 GB, other allocations: "
                                             "3 MB, max allowed: 9.07 GB). Tried to allocate 256.00 MB on private "
                                             "pool."))
    assert mps.startswith("The GPU ran out of memory while allocating 256.0 MB:"), mps
    cuda_call = RuntimeError("CUDA error: out of memory\nCompile with `TORCH_USE_CUDA_DSA` to enable device-side "
                             "assertions.")
    assert out_of_memory_message(cuda_call).startswith("The GPU ran out of memory:")
    # real CPU allocation failures: more bytes than any address space holds
    with pytest.raises(RuntimeError) as torch_cpu:
        torch.empty(1 << 62, dtype=torch.uint8)  # 4 EiB: more than any address space
    cpu = out_of_memory_message(torch_cpu.value)
    assert cpu.startswith("The computer's memory (CPU RAM) ran out while allocating 4.0 EiB:"), cpu
    with pytest.raises(MemoryError) as numpy_cpu:
        np.empty(1 << 60, np.uint8)
    assert out_of_memory_message(numpy_cpu.value).startswith(
        "The computer's memory (CPU RAM) ran out while allocating 1.0 EiB:"), out_of_memory_message(numpy_cpu.value)
    for message in (gpu, mps, cpu):
        assert "\n" not in message and message.endswith(".") and message.count(". ") == 0, message
        assert "image size" in message and "number of frames" in message and "smaller model" in message, message
        assert "--device" not in message and "steps" not in message, message
    # anything else is not an out-of-memory error (a bug keeps its traceback)
    for other in (RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"), ValueError("out of memory"),
                  OSError(2, "No such file or directory"), KeyError("memory")):
        assert out_of_memory_message(other) is None, other


def test_a_handler_out_of_memory_frees_what_the_call_held_and_is_one_warning_line(monkeypatch, caplog):
    """Plain and generator handlers: gr.Error with the sentence; the tensors the failed call held
    are gone while the visitor's error still exists (nothing refers to the failed frames); the
    GPU cache is emptied; the log has one warning line without a traceback."""
    from ui.common import user_errors_as_gradio

    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    held = []

    @user_errors_as_gradio
    def generate(size):
        activations = torch.zeros(size)  # what a request holds when the next allocation fails
        held.append(weakref.ref(activations))
        raise torch.OutOfMemoryError(CUDA_OOM)

    @user_errors_as_gradio
    def train(size):
        activations = torch.zeros(size)
        held.append(weakref.ref(activations))
        yield "step 1"
        np.empty(1 << 60, np.uint8)  # a real MemoryError

    caplog.set_level(logging.INFO, logger="app")
    for call, ran_out in ((lambda: generate(1000), "The GPU ran out"), (lambda: list(train(1000)), "CPU RAM")):
        caplog.clear()
        with pytest.raises(gr.Error) as caught:
            call()
        shown = caught.value
        assert shown.title == "Out of memory" and ran_out in shown.message, shown.message
        assert shown.__context__ is None and shown.__cause__ is None
        assert held[-1]() is None, "the failed call's tensors are still referenced"
        [record] = caplog.records
        assert record.levelno == logging.WARNING and record.exc_info is None
        assert "out of memory in" in record.getMessage() and ran_out in record.getMessage()
    assert len(emptied) == 2
    # a bug is still a bug: its own exception, untouched
    @user_errors_as_gradio
    def broken():
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        broken()


def test_a_full_disk_anywhere_in_a_handler_is_one_sentence(tmp_path, caplog):
    """A write that is not one of the atomic ones (a zip's member, a copy) runs out of room inside
    a tab handler: one sentence, one log line, no traceback; the atomic zip leaves no half file."""
    import errno

    from ui.common import DISK_FULL, user_errors_as_gradio, zip_files

    @user_errors_as_gradio
    def save():
        raise OSError(errno.ENOSPC, "No space left on device")

    caplog.set_level(logging.INFO, logger="app")
    with pytest.raises(gr.Error) as caught:
        save()
    assert caught.value.message == DISK_FULL and caught.value.__cause__ is None
    [record] = caplog.records
    assert record.exc_info is None and "user error in save" in record.getMessage()

    member = tmp_path / "big.bin"
    member.write_bytes(os.urandom(1 << 16))
    (tmp_path / "maps.zip").write_bytes(b"the previous archive")
    script = (f"import resource, sys; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; "
              f"from ui.common import zip_files; resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
              f"zip_files([Path({str(member)!r})], Path({str(tmp_path / 'maps.zip')!r}))")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "The disk is full or a file-size limit was reached" in run.stderr, run.stderr[-2000:]
    assert (tmp_path / "maps.zip").read_bytes() == b"the previous archive"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin", "maps.zip"]
    assert zip_files([member], tmp_path / "maps.zip").stat().st_size > 1 << 15  # with room: the archive


@pytest.mark.timeout(240)
def test_the_server_says_what_to_lower_after_an_out_of_memory_and_goes_on_serving(tmp_path, caplog):
    """The app in this process, called through gradio_client: a generation whose denoiser runs out
    of memory mid-way (attention processors attached, the model lock held) gives the sentence;
    the next generation, same seed, is pixel-identical to one made before the fault."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    import app
    from ui.common import OutputStore

    caplog.set_level(logging.INFO, logger="app")
    blocks, ctx = app.build_app(default_model="tiny", device="cpu", outputs=OutputStore(tmp_path / "results"))
    port = free_port()
    blocks.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}", verbose=False, download_files=str(tmp_path / "downloads"))
        request = dict(model="tiny", prompt="a red circle", negative_prompt="", seed=3, randomize_seed=False,
                       steps=3, guidance=7.5, width=64, height=64, layers="all", overlay_alpha=0.5,
                       api_name="/attention_maps")
        before = _pixels(Path(client.predict(**request)[0]))

        pipe = ctx.load("tiny")
        processors = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
        calls = []

        def runs_out_at_the_second_step(module, args):
            calls.append(True)
            if len(calls) == 2:
                raise torch.OutOfMemoryError(CUDA_OOM)

        hook = pipe.unet.conv_in.register_forward_pre_hook(runs_out_at_the_second_step)  # inside the UNet
        try:
            with pytest.raises(AppError) as caught:
                client.predict(**request)
        finally:
            hook.remove()
        assert len(calls) == 2
        assert_one_clean_sentence(str(caught.value), "The GPU ran out of memory", "lower the image size")
        # one warning line, no traceback: a request too large for the machine is not a bug
        logged = [record for record in caplog.records if "out of memory" in record.getMessage()]
        assert [(record.levelno, record.exc_info) for record in logged] == [(logging.WARNING, None)], logged
        assert not [record for record in caplog.records if record.levelno >= logging.ERROR]

        assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == processors
        after = _pixels(Path(client.predict(**request)[0]))
        assert np.array_equal(before, after)
    finally:
        blocks.close()


def test_running_out_of_memory_while_resuming_is_not_called_a_damaged_checkpoint(tmp_path, photo, monkeypatch):
    """Loading a checkpoint that does not fit in memory must not tell the person to throw it away."""
    from pipelines import models
    from pipelines.errors import UserInputError
    from pipelines.personalize import CHECKPOINT, Trainer

    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    trainer = Trainer(models.load("tiny", device="cpu", dtype=torch.float32), photo, "cat,dog", "disendiff", tmp_path,
                      steps=1, prior_images=1)
    with pytest.raises(UserInputError, match="not readable"):
        trainer.try_resume()

    def too_large(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 1073741824 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(torch, "load", too_large)
    with pytest.raises(RuntimeError) as caught:
        trainer.try_resume()
    message = out_of_memory_message(caught.value)
    assert message.startswith("The computer's memory (CPU RAM) ran out while allocating 1.0 GiB"), message


def _cpu_allocator_failure(*args, **kwargs):
    raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                       "memory: you tried to allocate 1073741824 bytes. Error code 12 (Cannot allocate memory)")


def test_running_out_of_memory_while_opening_a_model_is_not_called_a_bad_file(tmp_path, monkeypatch):
    """A single-file checkpoint or a SAM2 model that does not fit is not "unreadable" or
    "missing": the error reaches the request's handler, which says what ran out."""
    from pipelines import grounding, models
    from pipelines.errors import UserInputError

    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserInputError, match="not a readable .safetensors file"):
        models._open_checkpoint(bad)
    monkeypatch.setattr(models, "_LazyCheckpoint", _cpu_allocator_failure)
    with pytest.raises(RuntimeError) as caught:
        models._open_checkpoint(bad)
    assert out_of_memory_message(caught.value).startswith("The computer's memory (CPU RAM) ran out")

    import transformers

    with pytest.raises(UserInputError, match="^No SAM2 model at"):
        grounding.load_sam2(str(tmp_path / "no-sam2-here"))
    monkeypatch.setattr(transformers.Sam2Model, "from_pretrained", _cpu_allocator_failure)
    with pytest.raises(RuntimeError) as caught:
        grounding.load_sam2(str(tmp_path / "sam2-too-large"))
    assert out_of_memory_message(caught.value).startswith("The computer's memory (CPU RAM) ran out")


OOM_SCRIPT = r"""
import re, resource, sys
import numpy as np
from PIL import Image

import app

def mapped():  # the process's virtual memory now (what RLIMIT_AS limits)
    return int(re.search(r"VmSize:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

rng = np.random.RandomState(0)
Image.fromarray((rng.rand(128, 128, 3) * 255).astype(np.uint8)).save("photo.png")
mask = np.zeros((128, 128), np.uint8)
mask[32:64, 32:64] = 255
Image.fromarray(mask).save("mask.png")
erase = ["erase", "--model", "tiny", "--device", "cpu", "--image", "photo.png", "--mask", "mask.png",
         "--steps", "2", "--seed", "0", "--crop", "never"]
# a small request first: the model is loaded and torch's threads and allocator are warm
assert app.main(erase + ["--output", "small.png", "--working-side", "64"]) == 0
margin = int(sys.argv[1]) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (mapped() + margin, resource.RLIM_INFINITY))
print("limit set", flush=True)
sys.exit(app.main(erase + ["--output", "large.png", "--working-side", "2048"]))
"""


@pytest.mark.timeout(180)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS limits allocations only on Linux")
def test_the_cli_says_what_to_lower_when_the_cpu_memory_runs_out(tmp_path):
    """A real allocation failure: after a small erase, the process's address space is limited to
    what it maps now plus 256 MiB; an erase at 2048x2048 needs far more (each activation of the
    VAE's first block alone is 128 MiB at that size) and fails in the first layers."""
    proc = _run([sys.executable, "-c", OOM_SCRIPT, "256"], cwd=tmp_path)
    assert "limit set" in proc.stdout, proc.stderr[-3000:]
    message = assert_user_error(proc, "The computer's memory (CPU RAM) ran out", "lower the image size")
    assert "while allocating" in message
    assert not (tmp_path / "large.png").exists() and not _hidden(tmp_path)


# ================================================================================ full disk


EFBIG_SCRIPT = r"""
import hashlib, json, resource, sys
from pathlib import Path
import numpy as np
import torch
from PIL import Image

from pipelines.errors import UserInputError
from pipelines.io import save_image, save_tensors, save_torch, write_video

rng = np.random.RandomState(0)
def noise(side):
    return Image.fromarray((rng.rand(side, side, 3) * 255).astype(np.uint8))

writers = {  # a checkpoint, a learned file and a result PNG (with its sidecar): small, then large
    "checkpoint.pt": lambda n: save_torch({"step": n, "kv": torch.randn(n * 1000)}, "checkpoint.pt", "the checkpoint"),
    "learned.safetensors": lambda n: save_tensors("learned.safetensors", {"rows": torch.randn(n * 1000)},
                                                  {"format": "test"}, "learned file"),
    "result.png": lambda n: save_image(noise(16 * n), "result.png", {"size": 16 * n}),
    "result.mp4": lambda n: write_video([noise(8 * n) for _ in range(n)], "result.mp4"),
}
for write in writers.values():
    write(2)
before = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in Path(".").iterdir()}
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))  # SIGXFSZ ignored: EFBIG
errors = {}
for name, write in writers.items():
    try:
        write(40)
        errors[name] = None
    except UserInputError as error:
        errors[name] = str(error)
print(json.dumps({"before": before, "errors": errors}))
"""


@pytest.mark.timeout(120)
@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="no RLIMIT_FSIZE on this platform")
def test_a_write_past_a_file_size_limit_keeps_the_previous_file(tmp_path):
    """Real write failures (EFBIG, as a full disk's ENOSPC): torch.save, safetensors and PIL each
    report it their own way (a RuntimeError, a SafetensorError, an OSError) and FFmpeg not at all
    (it leaves a video without its index); every one is one sentence, the previous file is
    byte-identical and no temporary file is left."""
    import hashlib

    limit = 60_000  # the small files are under it (under 10 KB), the large ones over it (over 150 KB)
    proc = _run([sys.executable, "-c", EFBIG_SCRIPT, str(limit)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = report["errors"]
    assert set(errors) == {"checkpoint.pt", "learned.safetensors", "result.png", "result.mp4"}
    for name, message in errors.items():
        assert message is not None, f"{name}: the write past the limit did not fail"
        assert_one_clean_sentence(message, "file-size limit was reached", "the previous one (if any) is kept")
    no_room = "The disk is full or a file-size limit was reached:"
    assert f"{no_room} the checkpoint could not be written" in errors["checkpoint.pt"]
    assert f"{no_room} the learned file could not be written" in errors["learned.safetensors"]
    assert f"{no_room} 'result.png' could not be written" in errors["result.png"]
    assert "'result.mp4' could not be written completely" in errors["result.mp4"]
    assert not _hidden(tmp_path), _hidden(tmp_path)
    after = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in tmp_path.iterdir()}
    assert set(after) == {"checkpoint.pt", "learned.safetensors", "result.png", "result.json", "result.mp4"}
    assert after == report["before"]  # the small versions, byte for byte


# ================================================================================ killed processes

# 40 steps of about 60 ms: the kill at step 2 comes while more than a second of training is left
TRAIN = ["personalize", "train", "--model", "tiny", "--device", "cpu", "--concepts", "cat,dog", "--steps", "40",
         "--checkpoint-every", "1", "--prior-images", "1", "--prior-steps", "2", "--batch-size", "1",
         "--grad-accum", "1"]


def _checkpoint_step(folder: Path) -> int | None:
    try:
        return int(torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)["step"])
    except Exception:  # noqa: BLE001 (not written yet)
        return None


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the process ended (status {proc.returncode}) before it could be killed"
        assert time.monotonic() < deadline, "the process never got there"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def _learned(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.timeout(300)
@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE") or not hasattr(signal, "SIGKILL"),
                    reason="no RLIMIT_FSIZE or SIGKILL on this platform")
def test_a_killed_training_loses_at_most_its_step_survives_a_full_disk_and_resumes_identically(
        tmp_path, photo, one_thread):
    """SIGKILL once the checkpoint of step 2 is there; a rerun under a file-size limit smaller than
    the checkpoint resumes, trains a step, cannot save it: one sentence, the killed run's
    checkpoint and learned file byte-identical; with room again the rerun resumes from the killed
    run's last step and ends bit-identical to an uninterrupted run.  The temporary files a kill
    leaves behind (one is planted, cut short) change nothing."""
    photo.save(tmp_path / "photo.png")
    train = [*TRAIN, "--image", str(tmp_path / "photo.png")]
    assert _in_process(*train, "--output", str(tmp_path / "straight")) == 0
    straight = _learned(tmp_path / "straight" / "learned.safetensors")

    run = tmp_path / "run"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(_app(*train, "--output", "run"), cwd=tmp_path, stdout=log, stderr=log,
                                env={**os.environ, **ONE_THREAD_ENV})
        _kill_when(proc, lambda: (_checkpoint_step(run) or 0) >= 2)
    killed_at = _checkpoint_step(run)
    assert 2 <= killed_at < 40, killed_at
    left = _hidden(run)  # what the kill cut short, if it struck during a write
    checkpoint, learned = (run / "checkpoint.pt").read_bytes(), (run / "learned.safetensors").read_bytes()
    (run / ".checkpoint.k1ll3d.pt").write_bytes(checkpoint[: len(checkpoint) // 2])
    (run / ".learned.k1ll3d.safetensors").write_bytes(learned[:100])
    left |= {".checkpoint.k1ll3d.pt", ".learned.k1ll3d.safetensors"}

    # a full disk: the checkpoint of the next step does not fit
    limit = len(checkpoint) // 2
    assert len(learned) < limit

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    full = _run(_app(*train, "--output", "run"), cwd=tmp_path, preexec_fn=small_files)
    assert_user_error(full, "The disk is full or a file-size limit was reached",
                      f"the checkpoint of step {killed_at + 1} could not be written", "previous one (if any) is kept")
    assert (run / "checkpoint.pt").read_bytes() == checkpoint
    assert (run / "learned.safetensors").read_bytes() == learned
    assert _hidden(run) == left

    resumed = _run(_app(*train, "--output", "run"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"trained 40 steps, resumed from step {killed_at}" in resumed.stdout, resumed.stdout
    assert _hidden(run) == left  # the rerun left none of its own; the killed run's stay (harmless)
    final = _learned(run / "learned.safetensors")
    assert final.keys() == straight.keys()
    assert all(torch.equal(final[name], straight[name]) for name in straight), "the resumed run differs"


def _scene(path: Path, seed: int) -> None:
    rng = np.random.RandomState(seed)
    Image.fromarray((rng.rand(64, 96, 3) * 255).astype(np.uint8)).save(path)


# 20 steps: about half a second per image, so that the kill comes while five more are to do
ERASE = ["erase", "--model", "tiny", "--device", "cpu", "--seed", "1", "--steps", "20", "--strength", "1"]
IMAGES = 6


@pytest.mark.timeout(300)
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="no SIGKILL on this platform")
def test_a_killed_folder_command_skips_what_it_finished_and_makes_the_rest_identically(tmp_path, one_thread):
    """`erase --folder` killed once its first result is written: the rerun skips the finished
    images, makes the others, and every result equals an uninterrupted run's; temporary files left
    in the output folder (one planted, as a kill during a write leaves it) and a hidden file in the
    input folder are ignored."""
    images, mask = tmp_path / "in", tmp_path / "mask.png"
    images.mkdir()
    names = [f"img{i}.png" for i in range(IMAGES)]
    for i, name in enumerate(names):
        _scene(images / name, i)
    array = np.zeros((64, 96), np.uint8)
    array[20:45, 30:60] = 255
    Image.fromarray(array).save(mask)
    args = [*ERASE, "--image", str(images), "--mask", str(mask)]
    assert _in_process(*args, "--output", str(tmp_path / "straight")) == 0

    out = tmp_path / "out"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(_app(*args, "--output", str(out)), cwd=tmp_path, stdout=log, stderr=log,
                                env={**os.environ, **ONE_THREAD_ENV})
        _kill_when(proc, lambda: (out / "img0.json").is_file())
    finished = sorted(p.with_suffix(".png").name for p in out.glob("img*.json"))  # the sidecar comes last
    assert "img0.png" in finished and len(finished) < IMAGES, finished
    left = _hidden(out) | {".img5.k1ll3d.png"}
    (out / ".img5.k1ll3d.png").write_bytes((images / "img5.png").read_bytes()[:200])  # cut short
    (images / ".img9.png").write_bytes(b"not an image")  # e.g. another program's temporary file

    rerun = _run(_app(*args, "--output", str(out)), cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for name in finished:
        assert f"skipped (already done): {name}" in rerun.stdout, rerun.stdout
    assert f"done: {IMAGES - len(finished)}, skipped: {len(finished)}, failed: 0" in rerun.stdout, rerun.stdout
    assert _hidden(out) == left
    assert sorted(p.name for p in out.glob("img*.png")) == names
    for name in names:
        assert np.array_equal(_pixels(out / name), _pixels(tmp_path / "straight" / name)), name
        assert (json.loads((out / name).with_suffix(".json").read_text())
                == json.loads((tmp_path / "straight" / name).with_suffix(".json").read_text())), name
