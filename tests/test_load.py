"""A bounded load test of the launched app (issue #17, item 5): loopback only, stops by itself.

`python app.py --model tiny` is started on a free 127.0.0.1 port.  First every request of a fixed
set (two tasks, `/attention_maps` and `/erase`, a few seeds each) is run serially, twice, and the
pixels of its result images are fingerprinted (the two serial passes must agree).  Then
`CLIENTS` (16) threads, each with its own `gradio_client.Client`, submit those requests round-robin
across the two tasks for `LOAD_TEST_SECONDS` (default 60), with the queue as the app configures
it (every GPU task shares one slot, `ui.common.GPU_CONCURRENCY`; `max_size=64`).  Each client
polls its job's status while it waits and records the queue positions (`rank`) it is shown.

Asserted: every request completes without an error; every result downloads whole (no empty or
cut-short image file: the race in Gradio's result cache this test found, fixed in
ui/gradio_fixes.py) and is pixel-identical to the serial run of the same (task, seed); some
client was shown a queue position > 0; the load phase
stops by itself (all threads join within the duration plus a grace); the server's memory (RSS of
the process and any children) stays flat; the server still answers afterwards.  No throughput
or latency is asserted (a loaded 2-core CI machine is slow and noisy); the figures are printed
(`pytest -s`) and kept in `SUMMARY` for quoting.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.utils import Status
from PIL import Image, UnidentifiedImageError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_server import launched_app, listening_addresses  # noqa: E402

LOAD_SECONDS = float(os.environ.get("LOAD_TEST_SECONDS", "60"))
CLIENTS = 16
SEEDS = (0, 1, 2, 3)  # per task: 8 distinct requests
REQUEST_TIMEOUT = 300.0  # one request, queue wait included (16 queued x ~1 s here; far more on a slow CI box)
GRACE = REQUEST_TIMEOUT + 60.0  # after the deadline each thread only waits for the job it already submitted
POLL = 0.05  # seconds between job.status() polls
RSS_SAMPLE = 0.5  # seconds between memory samples

# Memory bounds.  Measured here (2 shared cores, CPU torch, gradio 6.31): the server's RSS is ~650 MB
# after the serial passes and rises by 55-60 MB over a 60 s run (~80 requests) and by ~80 MB over
# 180 s (~200 requests), ever more slowly (connection, session and queue bookkeeping, allocator
# arenas): per fifth of the 180 s run +48, +13, +6, +4, +1 MB.  The bounds leave 2.5-4x that room
# for a slower machine's allocator.  They catch a leak of a few MB per request (a full-size
# pipeline output kept per call) within a minute; a leak of one 64 px image per request
# (~12 KB) is below what a one-minute run can tell from allocator noise.
RSS_GROWTH_MB = 200.0  # after the run (and its peak) over the level after the serial warm-up
# Flatness inside the run: the peak of the last quarter of the samples over the peak of the first
# quarter (measured 22-27 MB): a leak grows all run long, a step at first contact does not.
RSS_LATE_GROWTH_MB = 100.0

pytestmark = pytest.mark.timeout(int(LOAD_SECONDS + GRACE + 480))  # startup + serial passes + load + drain

AM = dict(model="tiny", negative_prompt="", randomize_seed=False, steps=2, guidance=7.5, width=64,
          height=64, layers="all", overlay_alpha=0.5)
ERASE = dict(model="tiny", grow=0, randomize_seed=False, steps=2, strength=1.0, guidance=9, ss_steps=9,
             ss_scale=0.3, mode="sip", num_images=1)

#: The figures of the last run (requests per task, queue positions, latency, RSS): for quoting.
SUMMARY: dict = {}


@dataclass(frozen=True)
class Request:
    task: str  # the endpoint
    seed: int


def pixels(path) -> str:
    """A fingerprint of an image file's decoded pixels (mode, size and every byte)."""
    with Image.open(path) as img:
        img.load()
        digest = hashlib.sha256(f"{img.mode} {img.size}".encode())
        digest.update(img.tobytes())
    return digest.hexdigest()


def fingerprint(request: Request, result) -> tuple:
    """The seed the server used and the pixels of every image the request returned."""
    if request.task == "/attention_maps":
        image, gallery, seed, _files = result
        return int(seed), pixels(image), tuple(pixels(item["image"]) for item in gallery)
    pair, gallery, overlay, seed, _files = result
    if isinstance(pair, dict):  # the ImageSlider comes back as an update: {"value": [before, after], ...}
        pair = pair["value"]
    return (int(seed), tuple(pixels(p) for p in pair), tuple(pixels(item["image"]) for item in gallery),
            pixels(overlay))


class Inputs:
    """The arguments of each request; `/erase` gets a fresh `handle_file` per call (it is uploaded)."""

    def __init__(self, folder: Path):
        rng = np.random.RandomState(0)
        self.photo = folder / "photo.png"
        self.mask = folder / "mask.png"
        Image.fromarray((rng.rand(64, 64, 3) * 255).astype(np.uint8)).save(self.photo)
        mask = np.zeros((64, 64), np.uint8)
        mask[20:44, 20:44] = 255
        Image.fromarray(mask).save(self.mask)

    def kwargs(self, request: Request) -> dict:
        if request.task == "/attention_maps":
            return dict(prompt="a photo of a cat", seed=request.seed, **AM)
        return dict(image={"background": handle_file(str(self.photo)), "layers": [], "composite": None},
                    mask=handle_file(str(self.mask)), seed=request.seed, **ERASE)


def rss_bytes(pid: int) -> int:
    """Resident memory of the process and its children (the app starts none today)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            proc = psutil.Process(pid)
            total = proc.memory_info().rss
            for child in proc.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            return total
        except psutil.NoSuchProcess:
            return 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class ClientLog:
    done: dict = field(default_factory=lambda: {"/attention_maps": 0, "/erase": 0})
    latencies: list = field(default_factory=list)
    ranks: list = field(default_factory=list)  # every queue position this client was shown
    queue_sizes: list = field(default_factory=list)
    mismatches: list = field(default_factory=list)
    torn: list = field(default_factory=list)  # results whose downloaded image could not be decoded
    error: BaseException | None = None


def run_client(index: int, url: str, folder: Path, inputs: Inputs, requests: list[Request],
               expected: dict, start: threading.Barrier, clock: dict, log: ClientLog) -> None:
    """Connect, wait for every client, then submit requests round-robin (the tasks alternate)
    until the deadline; poll each job's status while it waits; check every result."""
    try:
        client = Client(url, verbose=False, download_files=str(folder), analytics_enabled=False)
        start.wait(timeout=180)  # the barrier's action sets clock["deadline"]
        turn = index  # clients start at different requests, so the queue holds both tasks at once
        while time.monotonic() < clock["deadline"]:
            request = requests[turn % len(requests)]
            turn += 1
            began = time.monotonic()
            job = client.submit(**inputs.kwargs(request), api_name=request.task)
            while not job.done():
                status = job.status()
                if status.code == Status.IN_QUEUE and status.rank is not None:
                    log.ranks.append(int(status.rank))
                    if status.queue_size is not None:
                        log.queue_sizes.append(int(status.queue_size))
                if time.monotonic() - began > REQUEST_TIMEOUT:
                    raise TimeoutError(f"{request} took over {REQUEST_TIMEOUT}s")
                time.sleep(POLL)
            try:
                result = job.result(timeout=REQUEST_TIMEOUT)  # the client downloads the result files here
            except httpx.RemoteProtocolError as error:  # a result file shorter than its Content-Length
                log.torn.append(f"{request}: {type(error).__name__}: {error}")
                continue
            log.latencies.append(time.monotonic() - began)
            try:
                got = fingerprint(request, result)
            except (UnidentifiedImageError, OSError) as error:  # a downloaded result is empty or cut short
                log.torn.append(f"{request}: {type(error).__name__}: {error}")
                continue
            if got != expected[request]:
                log.mismatches.append((request, got, expected[request]))
            log.done[request.task] += 1
    except BaseException as error:  # noqa: BLE001 - reported by the test
        log.error = error


def sample_memory(pid: int, stop: threading.Event, samples: list) -> None:
    while not stop.is_set():
        samples.append(rss_bytes(pid))
        stop.wait(RSS_SAMPLE)


def test_sixteen_clients_two_tasks_bounded_load(tmp_path):
    mb = 1024 * 1024
    server_tmp = tmp_path / "server"
    server_tmp.mkdir()
    inputs = Inputs(tmp_path)
    requests = [Request(task, seed) for seed in SEEDS for task in ("/attention_maps", "/erase")]

    # TMPDIR: the server's results and its Gradio cache land under pytest's tmp_path, not /tmp
    with launched_app("--model", "tiny", env={"TMPDIR": str(server_tmp)}) as server:
        pid = server.process.pid
        assert listening_addresses(server.port) == {"127.0.0.1"}  # loopback only

        # --- serial run, twice: the reference must itself be reproducible (the first pass warms up)
        serial = Client(server.url, verbose=False, download_files=str(tmp_path / "serial"),
                        analytics_enabled=False)
        expected, serial_seconds = {}, []
        for pass_ in range(2):
            for request in requests:
                began = time.monotonic()
                got = fingerprint(request, serial.predict(**inputs.kwargs(request), api_name=request.task))
                serial_seconds.append(time.monotonic() - began)
                if pass_ == 0:
                    expected[request] = got
                else:
                    assert got == expected[request], f"serial run not reproducible for {request}"
        assert len(set(expected.values())) == len(requests), "two requests gave the same result"
        rss_before = rss_bytes(pid)

        # --- load: CLIENTS threads, each its own Client, for LOAD_SECONDS once all are connected
        clock = {"deadline": float("inf")}
        ready = threading.Event()

        def open_the_gate():  # run by one thread when all CLIENTS have connected, before any submits
            clock["deadline"] = time.monotonic() + LOAD_SECONDS
            ready.set()

        start = threading.Barrier(CLIENTS, action=open_the_gate)
        logs = [ClientLog() for _ in range(CLIENTS)]
        threads = [threading.Thread(target=run_client, daemon=True, name=f"load-client-{i}",
                                    args=(i, server.url, tmp_path / f"client{i}", inputs, requests,
                                          expected, start, clock, logs[i]))
                   for i in range(CLIENTS)]
        samples: list = []
        stop_sampling = threading.Event()
        sampler = threading.Thread(target=sample_memory, args=(pid, stop_sampling, samples), daemon=True)
        for thread in threads:
            thread.start()
        assert ready.wait(timeout=240), "the clients did not all connect: " + repr(
            [log.error for log in logs if log.error])
        load_began = time.monotonic()
        sampler.start()
        for thread in threads:  # bounded: the deadline, then only the jobs already submitted
            thread.join(timeout=max(0.0, clock["deadline"] + GRACE - time.monotonic()))
        load_seconds = time.monotonic() - load_began
        still_running = [thread.name for thread in threads if thread.is_alive()]
        time.sleep(2.0)
        stop_sampling.set()
        sampler.join(timeout=10)
        rss_after = rss_bytes(pid)

        # --- the server still answers, with the same result as before the load
        with urllib.request.urlopen(server.url + "/", timeout=30) as response:
            assert response.status == 200
        again = fingerprint(requests[0], serial.predict(**inputs.kwargs(requests[0]),
                                                        api_name=requests[0].task))
        assert again == expected[requests[0]], "the server answers differently after the load"

    latencies = sorted(t for log in logs for t in log.latencies)
    ranks = [r for log in logs for r in log.ranks]
    quarter = max(1, len(samples) // 4)
    SUMMARY.clear()
    SUMMARY.update(
        clients=CLIENTS, seconds=LOAD_SECONDS, load_phase_s=round(load_seconds, 1),
        done={task: sum(log.done[task] for log in logs) for task in ("/attention_maps", "/erase")},
        serial_median_s=round(statistics.median(serial_seconds), 2),
        latency_median_s=round(statistics.median(latencies), 2) if latencies else None,
        latency_max_s=round(max(latencies), 2) if latencies else None,
        max_queue_position=max(ranks, default=None),
        clients_shown_a_position=sum(1 for log in logs if any(r > 0 for r in log.ranks)),
        max_queue_size=max((q for log in logs for q in log.queue_sizes), default=None),
        rss_before_mb=round(rss_before / mb, 1), rss_peak_mb=round(max(samples, default=0) / mb, 1),
        rss_after_mb=round(rss_after / mb, 1),
        rss_trend_mb=[round(samples[min(len(samples) - 1, i * len(samples) // 5)] / mb) for i in range(6)]
        if samples else [],
        rss_first_quarter_peak_mb=round(max(samples[:quarter], default=0) / mb, 1),
        rss_last_quarter_peak_mb=round(max(samples[-quarter:], default=0) / mb, 1),
        mismatches=sum(len(log.mismatches) for log in logs),
        torn_downloads=sum(len(log.torn) for log in logs),
        errors=[f"{type(log.error).__name__}: {log.error}" for log in logs if log.error],
    )
    print("\nload summary:", SUMMARY)

    assert not still_running, f"load phase did not stop by itself: {still_running}"
    assert SUMMARY["errors"] == [], SUMMARY["errors"]
    assert all(sum(log.done.values()) >= 1 for log in logs), "a client completed no request"
    assert all(SUMMARY["done"][task] >= 1 for task in SUMMARY["done"]), SUMMARY["done"]
    torn = [t for log in logs for t in log.torn][:3]
    assert SUMMARY["torn_downloads"] == 0, (
        f"{SUMMARY['torn_downloads']} results came back with an empty or cut-short image, e.g. {torn}. "
        "Gradio writes a returned PIL image into its cache in place (processing_utils.save_pil_to_cache: "
        "Path.write_bytes, no temporary file and rename), at a path named after the image's bytes, so an "
        "identical result of a later request rewrites the file while an earlier client downloads it")
    mismatched = [m for log in logs for m in log.mismatches][:3]
    assert SUMMARY["mismatches"] == 0, f"results differ from the serial run: {mismatched}"
    assert SUMMARY["max_queue_position"] is not None and SUMMARY["max_queue_position"] > 0, \
        "no client was shown a queue position"
    assert SUMMARY["rss_after_mb"] - SUMMARY["rss_before_mb"] < RSS_GROWTH_MB, SUMMARY
    assert SUMMARY["rss_peak_mb"] - SUMMARY["rss_before_mb"] < RSS_GROWTH_MB, SUMMARY
    assert SUMMARY["rss_last_quarter_peak_mb"] - SUMMARY["rss_first_quarter_peak_mb"] < RSS_LATE_GROWTH_MB, \
        SUMMARY
