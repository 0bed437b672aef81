"""A cached model is shared: every task leaves it exactly as it found it, and tasks run at the
same time from several threads get exactly the results they get one after the other.

(Tasks change the model during a call, and undo it; `models.exclusive` keeps other calls out
meanwhile.  See the comment above it in pipelines/models.py.)
"""

import functools
import tempfile
import threading
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import attention_maps, eraser, grounding, models, personalize, steering

FREEU_ATTRIBUTES = ("b1", "b2", "s1", "s2")


def photo(width=64, height=64, seed=0):
    array = (np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8)
    array[30:56, 34:60] = [40, 40, 230]
    return Image.fromarray(array)


def mask():
    m = np.zeros((64, 64), bool)
    m[30:56, 34:60] = True
    return m


def snapshot(pipe) -> dict:
    """Everything a task could leave changed: weights, dtypes, devices, gradient flags, modes,
    hooks, attention processors, FreeU attributes, the scheduler object and its config, the
    progress-bar settings.  (Not the scheduler's timesteps: every pipeline call sets those.)"""
    state = {"progress": dict(getattr(pipe, "_progress_bar_config", {}))}
    for part, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            for name, p in component.named_parameters():
                state[f"{part}.{name}"] = (p.dtype, p.device, p.requires_grad, p.data_ptr(),
                                          float(p.detach().double().sum()))
            for name, m in component.named_modules():
                state[f"{part}.{name}#module"] = (
                    m.training, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                    id(m.get_processor()) if hasattr(m, "get_processor") else None,
                    tuple(getattr(m, a, None) for a in FREEU_ATTRIBUTES),
                )
        elif hasattr(component, "config") and hasattr(component, "set_timesteps"):
            state[f"{part}#scheduler"] = (id(component), dict(component.config))
        else:
            state[f"{part}#object"] = id(component)
    return state


def run_attention_maps(pipe):
    result = attention_maps.generate_with_attention_maps(pipe, "a red circle and a blue square", seed=3, steps=2,
                                                         guidance=4.0, height=64, width=64)
    return [np.asarray(result.image), result.maps]


def run_erase(pipe):
    result = eraser.erase(pipe, photo(), mask(), seed=1, steps=3, strength=1.0, freeu=True, progress=False)
    return [np.asarray(result.image)]


def run_segment(pipe):
    result = grounding.segment_image(pipe, photo(96, 64), "the blue square on the right", size=64)
    return [result.heatmap, result.mask]


def run_steer(pipe):
    directions = steering.estimate_directions(pipe, "a photo of a cat", "a photo of a dog", samples=1, steps=2,
                                              height=64, width=64)
    pair = steering.counterfactual_pair(pipe, directions, "a photo of a cat", seed=3, beta=2)
    return [np.asarray(pair.original), np.asarray(pair.steered)]


def run_personalize(pipe):
    trainer = personalize.Trainer(pipe, photo(96, 72), "cat,dog", "disendiff", None, steps=2, prior_images=1,
                                  batch_size=1, grad_accum=1, prior_steps=2, lr=1e-3)
    losses = [info.loss for info in trainer.run()]
    learned = trainer.learned()
    image = personalize.generate(pipe, learned, f"a photo of {learned.tokens[0]}", seed=5, steps=2).image
    return [np.array(losses), np.asarray(image)]


TASKS = {"attention_maps": run_attention_maps, "erase": run_erase, "segment": run_segment, "steer": run_steer,
         "personalize": run_personalize}


@pytest.fixture(scope="module")
def shared():
    """One cached model, as the app and every Python caller get it."""
    return models.load("tiny", device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_a_task_leaves_the_cached_model_as_it_found_it(shared, task):
    before = snapshot(shared)
    TASKS[task](shared)
    after = snapshot(shared)
    changed = [key for key in before if before[key] != after.get(key)] + [key for key in after if key not in before]
    assert not changed, f"{task} left changed: {changed[:10]}"


def run_instruct(pipe):
    from pipelines.instruct import edit_by_instruction

    return [np.asarray(edit_by_instruction(pipe, photo(), "make the square red, and the background white",
                                           seed=3, steps=2).edited)]


def run_parts(pipe):
    from pipelines.instruct import generate_by_parts

    return [np.asarray(generate_by_parts(pipe, "a red circle and a blue square", seed=3, steps=2).edited)]


def run_edit_video(pipe):
    from pipelines.video import edit_video

    frames = [np.asarray(photo(32, 32, seed)) for seed in range(3)]
    with tempfile.TemporaryDirectory() as cache_dir:  # a fresh fine-tune and inversion every run
        result = edit_video(pipe, frames, "a photo of a cat", "a photo of a dog", ["dog:0,0,16,16"],
                            cache_dir=cache_dir, steps=2, tune_steps=1, refine_iterations=1, window=3)
    return [np.asarray(frame) for frame in result.frames]


def run_segment_video(pipe):
    frames = [np.asarray(photo(64, 64, seed)) for seed in range(3)]
    return [grounding.segment_video(pipe, frames, "the blue square").masks]


#: (task, model) beyond TASKS on "tiny": the other tasks, and other families' tokenizers and layouts
MORE = {
    "instruct": (run_instruct, "builtin-edit"),
    "instruct-kontext": (run_instruct, "tiny-flux-kontext"),
    "instruct-omnigen": (run_instruct, "tiny-omnigen"),
    "parts": (run_parts, "builtin"),
    "edit_video": (run_edit_video, "tiny"),
    "segment_video": (run_segment_video, "tiny"),
    "attention_maps-flux": (run_attention_maps, "tiny-flux"),
    "segment-sd3": (run_segment, "tiny-sd3"),
}


@contextmanager
def uses_outside_the_lock(pipe, monkeypatch):
    """Record every use of `pipe`'s shared components (a module's forward or any of its direct
    children's, a tokenizer call, the scheduler's timesteps or steps) by a thread that does not
    hold `models.exclusive(pipe)`."""
    found: list[str] = []
    modules, others = {}, {}
    for part, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            modules[component] = part
            modules.update({child: f"{part}.{name}" for name, child in component.named_children()})
        elif component is not None:
            others[id(component)] = part

    def check(what):
        if not models.holds(pipe):
            found.append(f"{what} in {threading.current_thread().name}")

    def pre_hook(module, args):
        if module in modules:  # not a copy of the module that inherited the hook (the video UNet)
            check(modules[module])

    handles = [m.register_forward_pre_hook(pre_hook) for m in modules]
    for kind, methods in ((type(pipe.scheduler), ("set_timesteps", "step")),
                          *((type(t), ("__call__", "tokenize", "encode")) for t in (
                              getattr(pipe, n, None) for n in ("tokenizer", "tokenizer_2", "tokenizer_3"))
                            if t is not None)):
        for method in methods:
            original = getattr(kind, method)

            @functools.wraps(original)  # the pipelines read set_timesteps' signature
            def watched(self, *args, _original=original, _method=method, **kwargs):
                if id(self) in others:
                    check(f"{others[id(self)]}.{_method}")
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(kind, method, watched)
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()
        monkeypatch.undo()


@pytest.mark.parametrize("task", sorted(TASKS) + sorted(MORE))
def test_a_task_uses_the_shared_models_parts_only_under_its_lock(task, monkeypatch):
    """What makes the threads test below hold, checked one task at a time and without luck: a
    task that tokenized, encoded or denoised outside `models.exclusive` would see (or make another
    thread see) a tokenizer's padding, processors or timesteps set by another call."""
    run, name = MORE.get(task, (TASKS.get(task), "tiny"))
    pipe = models.load(name, device="cpu", dtype=torch.float32)
    with uses_outside_the_lock(pipe, monkeypatch) as found:
        run(pipe)
    assert not found, sorted(set(found))


@pytest.fixture
def one_intra_op_thread():
    """Each torch operator on one thread while the threads test runs, so that its comparison can
    be exact whatever the machine's core count and load.  (It does not explain the rare
    1-grey-level difference described in that test: worker threads see one thread too.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def all_at_once(shared) -> dict[str, list]:
    """Every task of TASKS started at the same moment, each in its own thread, on `shared`."""
    together: dict[str, list] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(TASKS))

    def worker(task):
        try:
            start.wait()
            together[task] = TASKS[task](shared)
        except BaseException as error:  # reported below, with the task's name
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(task,), name=task) for task in TASKS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert sorted(together) == sorted(TASKS)
    return together


def differences(got: dict[str, list], expected: dict[str, list]) -> list[str]:
    """One line per output of a task that is not bit-identical to the expected one."""
    lines = []
    for task in TASKS:
        for index, (a, b) in enumerate(zip(got[task], expected[task])):
            a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
            if a.shape != b.shape:
                lines.append(f"{task} output {index}: shape {a.shape} instead of {b.shape}")
            elif not np.array_equal(a, b):
                lines.append(f"{task} output {index}: {np.mean(a != b):.0%} of values differ, "
                             f"by {np.abs(a - b).max():g} at most")
    return lines


def test_tasks_in_threads_at_once_give_the_results_they_give_one_after_the_other(shared, one_intra_op_thread):
    """Bit-identical, or the same difference twice.  Once in about five full runs of the suite on
    a loaded 2-core machine, the steering pair computed in threads differed from the one computed
    alone by 1 grey level in most pixels (38 at most); its cause was not found (not the worker
    threads' intra-op thread count, not memory alignment: both checked), and this test alone did
    not show it again in 40 runs after the lock fixes.  A task seeing another's change to the
    shared model shows again when the threads run again, so a difference fails only when a second
    run repeats it; an error fails at once.  The cause of such leaks, a use of the shared parts
    outside the lock, is checked without luck by
    `test_a_task_uses_the_shared_models_parts_only_under_its_lock`."""
    alone = {task: run(shared) for task, run in TASKS.items()}
    first = differences(all_at_once(shared), alone)
    if not first:
        return
    warnings.warn(f"tasks in threads differed from the tasks alone once: {first}; running them again")
    second = differences(all_at_once(shared), alone)
    assert not second, f"first run: {first}; second run: {second}"
