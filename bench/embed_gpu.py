"""Embedding throughput: the bare model loop against the rayrm pipeline, same frames, one run.

Three numbers, in frames per second:

* ``model``    - DINOv2 only: the ViT forward on frames already preprocessed on the device;
* ``backbone`` - the bare loop: ``Backbone.embed_frames`` over uint8 frames held in memory
  (host-to-device copy and preprocessing included), batch after batch;
* ``pipeline`` - ``rayrm.embed.run_embed`` on a local Ray: HDF5 episodes in, Ray Data actor,
  Parquet shards out, end to end (model loads and Ray start-up included, so use enough frames);
  ``pipeline_steady`` - the same run from its first embeddings on (start-up excluded).

``--compile`` compiles the ViT in all three. The last line is the ratio pipeline / backbone.
Weights are random (no real weights here) with the released shapes: DINOv2 ViT-B/14-reg4
(``--backbone dinov2``), or Qwen3-VL in its ``tiny`` or ``8b`` debug flavour (``--backbone
qwen3_vl --flavour 8b``). ``--tiny`` picks small shapes and few frames so it runs on a CPU in
about a minute. Device: a GPU when torch sees one (bf16, ``backbone.dtype auto``), else the CPU
(fp32). Examples::

    python bench/embed_gpu.py --tiny
    python bench/embed_gpu.py --backbone dinov2 --size 224 224 --frames 8192
    python bench/embed_gpu.py --size 224 224 --frames 8192 --repeat 16 --compile
    python bench/embed_gpu.py --backbone dinov2 --size 476 644 --frames 2048
    python bench/embed_gpu.py --backbone qwen3_vl --flavour 8b --size 224 224 --frames 512
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time

import h5py
import numpy as np
import ray
import torch

from rayrm.backbones import build_backbone
from rayrm.backbones.qwen3_vl import frame_conversation
from rayrm.config import BackboneConfig, Config, EmbedConfig, RayConfig
from rayrm.devices import default_device
from rayrm.embed import run_embed
from rayrm.testing import write_debug_model, write_random_checkpoint

logger = logging.getLogger("bench.embed_gpu")
PROMPT = "Put the cube in the pot."


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", choices=["dinov2", "qwen3_vl"], default="dinov2")
    parser.add_argument("--flavour", help="vitb14_reg4 | vitb14 | debug; Qwen3-VL: tiny | 8b")
    parser.add_argument("--checkpoint", help="real weights instead of random ones")
    parser.add_argument("--size", nargs=2, type=int, default=[224, 224], metavar=("H", "W"))
    parser.add_argument("--frames", type=int, default=4096, help="distinct frames")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="the pipeline reads every episode this many times (HDF5 hard links to the same "
        "data, as further episodes): a minute of input without writing GBs of random frames",
    )
    parser.add_argument("--compile", action="store_true", help="backbone.options.compile")
    parser.add_argument(
        "--calls-per-actor", type=int, default=0, help="embed.calls_per_actor (0 = auto)"
    )
    parser.add_argument("--episode-frames", type=int, default=128, help="frames per episode")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU) | float32 | bfloat16")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    parser.add_argument("--tiny", action="store_true", help="small shapes and frames (CPU)")
    parser.add_argument("--workdir", help="folder for the weights, HDF5 and Parquet (default tmp)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.tiny:
        args.flavour = args.flavour or ("debug" if args.backbone == "dinov2" else "tiny")
        args.size, args.frames, args.episode_frames, args.batch_size = [56, 56], 512, 64, 64
    args.flavour = args.flavour or ("vitb14_reg4" if args.backbone == "dinov2" else "tiny")
    return args


def make_backbone_config(args, workdir: str) -> BackboneConfig:
    if args.backbone == "dinov2":
        path = args.checkpoint or write_random_checkpoint(
            os.path.join(workdir, f"{args.flavour}.pth"), args.flavour
        )
        options = {"num_heads": 2} if args.flavour == "debug" else {}
        if args.compile:
            options["compile"] = True
        return BackboneConfig(name="dinov2", checkpoint=path, dtype=args.dtype, options=options)
    path = args.checkpoint or os.path.join(workdir, f"qwen3_vl_{args.flavour}")
    if not args.checkpoint:
        os.makedirs(path, exist_ok=True)
        device = default_device()
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        max_pixels = args.size[0] * args.size[1]  # frames enter at their own size
        write_debug_model(path, args.flavour, max_pixels=max_pixels, device=device, dtype=dtype)
    return BackboneConfig(name="qwen3_vl", checkpoint=path, dtype=args.dtype)


def write_episodes(path: str, args) -> np.ndarray:
    """Random frames as HDF5 episodes (each ``--repeat`` times, as hard links); returns the
    distinct frames for the in-memory loops too."""
    rng = np.random.default_rng(0)
    h, w = args.size
    frames = rng.integers(0, 256, (args.frames, h, w, 3), dtype=np.uint8)
    with h5py.File(path, "w") as f:
        f.attrs["prompt"] = PROMPT
        starts = range(0, args.frames, args.episode_frames)
        for i, start in enumerate(starts):
            chunk = frames[start : start + args.episode_frames]
            f.create_group(f"episode_{i:05d}").create_dataset("side_cam", data=chunk)
        for copy in range(1, args.repeat):
            for i in range(len(starts)):
                f[f"episode_{copy:03d}_{i:05d}"] = f[f"episode_{i:05d}"]
    return frames


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_loop(step, batches: list, device: torch.device, warmup: int) -> float:
    """Frames per second of ``step`` over ``batches``, after ``warmup`` untimed batches."""
    for batch in batches[:warmup]:
        step(batch)
    synchronize(device)
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    synchronize(device)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def bench_backbone(backbone, frames: np.ndarray, args) -> dict[str, float]:
    batches = [frames[i : i + args.batch_size] for i in range(0, len(frames), args.batch_size)]
    prompts = [PROMPT] * args.batch_size
    results = {}
    if args.backbone == "dinov2":
        encoder = backbone.encoder
        forward = encoder.model if encoder.compiled is None else encoder.compiled
        pixels = [encoder.preprocess(b, encoder.device).to(encoder.dtype) for b in batches]

        @torch.inference_mode()
        def model_step(x):
            return forward(x)

        results["model"] = time_loop(model_step, pixels, backbone.device, args.warmup)
        del pixels
    results["backbone"] = time_loop(
        lambda b: backbone.embed_frames(b, prompts[: len(b)]), batches, backbone.device, args.warmup
    )
    return results


def bench_pipeline(
    backbone_cfg: BackboneConfig, h5_path: str, workdir: str, args
) -> tuple[float, float]:
    """(frames/s with start-up, frames/s after the first embeddings arrived)."""
    use_gpu = torch.cuda.is_available()
    cfg = Config(
        workdir=workdir,
        backbone=backbone_cfg,
        embed=EmbedConfig(
            input=h5_path,
            output=os.path.join(workdir, "embeddings"),
            batch_size=args.batch_size,
            frames_per_block=args.batch_size,
            num_gpus_per_actor=1.0 if use_gpu else 0.0,
            calls_per_actor=args.calls_per_actor,
            overwrite=True,
        ),
        ray=RayConfig(),
    )
    result = run_embed(cfg)
    steady = result.embedded_frames / max(result.seconds - result.startup_seconds, 1e-9)
    logger.info("pipeline start-up (first embeddings) %.1f s", result.startup_seconds)
    return result.frames_per_second, steady


def tokens_per_frame(backbone, size) -> float | None:
    """Qwen3-VL's sequence length for one frame and the prompt (None for DINOv2)."""
    inputs = getattr(backbone, "inputs", None)
    if inputs is None:
        return None
    frame = np.zeros((*size, 3), np.uint8)
    return float(inputs([frame_conversation(PROMPT)], [frame])["input_ids"].shape[1])


def run(args) -> dict:
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        backbone_cfg = make_backbone_config(args, workdir)
        h5_path = os.path.join(workdir, "episodes.h5")
        frames = write_episodes(h5_path, args)
        backbone = build_backbone(backbone_cfg)
        device = backbone.device
        results = bench_backbone(backbone, frames, args)
        tokens = tokens_per_frame(backbone, args.size)
        del backbone
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the pipeline's actor loads its own copy
        ray.init(include_dashboard=False, log_to_driver=False)
        try:
            results["pipeline"], results["pipeline_steady"] = bench_pipeline(
                backbone_cfg, h5_path, workdir, args
            )
        finally:
            ray.shutdown()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return {
        "backbone": args.backbone,
        "flavour": args.flavour,
        "device": name,
        "dtype": str(backbone_cfg.dtype),
        "size": args.size,
        "frames": args.frames,
        "pipeline_frames": args.frames * args.repeat,
        "compile": args.compile,
        "batch_size": args.batch_size,
        "tokens_per_frame": tokens,
        "frames_per_second": results,
    }


def main(argv=None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = parse_args(argv)
    report = run(args)
    for key, fps in report["frames_per_second"].items():
        logger.info("%-9s %10.1f frames/s", key, fps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    logger.info(
        "setup: %s", json.dumps({k: v for k, v in report.items() if k != "frames_per_second"})
    )
    fps = report["frames_per_second"]
    logger.info("ratio pipeline/backbone: %.3f", fps["pipeline"] / fps["backbone"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
