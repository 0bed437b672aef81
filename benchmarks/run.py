"""Speed and memory of a task against the plain diffusers pipeline doing the same model calls.

    python benchmarks/run.py generate [--model tiny] [--steps 10] [--size 64] [--repeats 5] [--breakdown]

Runs the method and its baseline in one process, alternating (method, baseline, method, ...)
after one warm-up each, and prints one JSON line:
    {"task", "model", "device", "dtype", "size", "steps", "repeats", "method_s", "baseline_s",
     "ratio", "peak_mem_ratio"}
method_s and baseline_s are medians.  peak_mem_ratio is the ratio of peak allocated CUDA memory
on a GPU, and of the process's peak resident memory during each run on a CPU (where weights
dominate, so it stays near 1 unless a method allocates a lot).

`--model sd15-random` builds the full-size SD 1.5 architecture (UNet, CLIP ViT-L/14 text encoder,
VAE) with random weights: real-size speed and memory without downloading anything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import models  # noqa: E402
from pipelines.attention_maps import generate_with_attention_maps  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse on the moon"


def sd15_random(device: torch.device, dtype: torch.dtype):
    """The SD 1.5 architecture with seeded random weights (configs of the public checkpoint)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipelines.tokenizers import clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
    ))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return pipe.to(device=device, dtype=dtype)


class PeakMemory:
    """Peak memory during a block: CUDA allocator peak, or sampled process RSS on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            import psutil

            process = psutil.Process()
            self._stop = threading.Event()

            def sample():
                while not self._stop.is_set():
                    self.peak = max(self.peak, process.memory_info().rss)
                    self._stop.wait(0.005)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()


def timed(fn, device):
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return elapsed, memory.peak


def bench_generate(pipe, args):
    """Heatmap capture on every text-attention layer vs the same pipeline call without it.

    With --breakdown, two intermediate variants show where the time goes: the controlled
    processors installed on the same layers with a controller that does nothing ("processors"),
    and the heatmap capture without the final word maps ("capture").
    """
    from attention_processors import AttentionController, ControlState, attach, attention_layer_names
    from attention_processors.heatmaps import CrossAttentionHeatmaps, text_attention_layers

    extra = models.call_defaults(pipe)
    denoiser = pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet
    layers = text_attention_layers(attention_layer_names(denoiser))

    def method():
        generate_with_attention_maps(pipe, PROMPT, seed=0, steps=args.steps, guidance=7.5,
                                     height=args.size, width=args.size)

    def baseline():
        pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=7.5, height=args.size, width=args.size,
             generator=torch.Generator().manual_seed(0), **extra)

    class Passive(AttentionController):
        def select(self, name):
            return name in layers

    def with_controller(make):
        def run():
            with attach(denoiser, make()):
                baseline()
        return run

    roles = ("uncond", "cond")
    variants = {
        "processors": with_controller(lambda: Passive(ControlState(roles))),
        "capture": with_controller(lambda: CrossAttentionHeatmaps(layers, keep=12, state=ControlState(roles))),
    }
    return method, baseline, variants


TASKS = {"generate": bench_generate}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--model", default="tiny", help="registry name, or sd15-random (full-size, random weights)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: the registry's)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--breakdown", action="store_true", help="also time the task's intermediate variants")
    args = parser.parse_args(argv)

    device = torch.device(args.device) if args.device else models.default_device()
    dtype = getattr(torch, args.dtype) if args.dtype else models.default_dtype(device)
    if args.model == "sd15-random":
        pipe = sd15_random(device, dtype)
        args.size = args.size or 512
    else:
        pipe = models.load(args.model, device=device, dtype=dtype)
        args.size = args.size or 64
    pipe.set_progress_bar_config(disable=True)
    method, baseline, variants = TASKS[args.task](pipe, args)
    variants = variants if args.breakdown else {}

    method(), baseline()  # warm-up: kernels, allocator, caches
    method_runs, baseline_runs = [], []
    variant_runs = {name: [] for name in variants}
    for _ in range(args.repeats):
        method_runs.append(timed(method, device))
        baseline_runs.append(timed(baseline, device))
        for name, variant in variants.items():
            variant_runs[name].append(timed(variant, device)[0])
    method_s = statistics.median(t for t, _ in method_runs)
    baseline_s = statistics.median(t for t, _ in baseline_runs)
    method_mem = max(m for _, m in method_runs)
    baseline_mem = max(m for _, m in baseline_runs)
    breakdown = {f"{name}_ratio": round(statistics.median(runs) / baseline_s, 3) for name, runs in variant_runs.items()}
    print(json.dumps({
        "task": args.task,
        "model": args.model,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": str(dtype).removeprefix("torch."),
        "size": args.size,
        "steps": args.steps,
        "repeats": args.repeats,
        "method_s": round(method_s, 4),
        "baseline_s": round(baseline_s, 4),
        "ratio": round(method_s / baseline_s, 3),
        "peak_mem_ratio": round(method_mem / baseline_mem, 3),
        **breakdown,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
