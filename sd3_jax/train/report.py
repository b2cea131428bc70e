"""What a training run reports: WORKDIR/metrics.jsonl, TensorBoard events in WORKDIR/tensorboard/ (the same
scalars, and sample grids), and the grids as PNGs in WORKDIR/samples/.

    tensorboard --logdir WORKDIR

TensorBoard tags: `train/loss` (every step), `train/<name>` for each field of a log line (lr, grad_norm,
steps_per_s, images_per_s, mfu), `eval/val_loss`, and the image `samples` (one grid: a row per prompt,
EMA params, fixed seeds). The writer is tensorboardX's (no TensorFlow).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

SampleFn = Callable[[Any], np.ndarray]  # EMA params -> (N, H, W, 3) uint8


class MetricsWriter:
    """Appends one JSON object per line to WORKDIR/metrics.jsonl and the same numbers to TensorBoard
    (process 0 only). Resuming drops the lines of steps after the checkpoint, and TensorBoard's events of
    those steps (`purge_step`)."""

    def __init__(self, workdir: str, resume_step: int, tensorboard: bool = True):
        self.workdir = workdir
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.active = jax.process_index() == 0
        self.tb = None
        if not self.active:
            return
        if os.path.exists(self.path):
            # Steps after the checkpoint we resume from are run again: drop their old lines.
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(kept)
        if tensorboard:
            from tensorboardX import SummaryWriter

            logdir = os.path.join(workdir, "tensorboard")
            self.tb = SummaryWriter(logdir, purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is None:
            return
        step = record["step"]
        group = "eval" if record.get("kind") == "eval" else "train"
        for k, v in record.items():
            if k not in ("step", "kind") and isinstance(v, (int, float)):
                self.tb.add_scalar(f"{group}/{k}", v, step)

    def images(self, images: np.ndarray, step: int, rows: int) -> str | None:
        """A grid of `images` (rows x the rest) as WORKDIR/samples/step_NNNNNN.png and TensorBoard's
        `samples` at `step`; returns the PNG's path."""
        if not self.active:
            return None
        from PIL import Image

        grid = image_grid(images, rows)
        folder = os.path.join(self.workdir, "samples")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step_{step:06d}.png")
        Image.fromarray(grid).save(path + ".tmp.png")
        os.replace(path + ".tmp.png", path)
        if self.tb is not None:
            self.tb.add_image("samples", grid, step, dataformats="HWC")
        return path

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def image_grid(images: np.ndarray, rows: int) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows H, cols W, 3) image, row-major, N = rows x cols."""
    n, h, w, c = images.shape
    cols = n // rows
    return images.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def checkpoint_sampler(init_from: str, cfg: Any, mesh: Any = None) -> SampleFn:
    """Samples a TrainConfig's `sample_prompts` (each `sample_images` times, from `sample_seed`, in
    `sample_steps` steps, `sample_size` pixels or the checkpoint's size) with given MMDiT params and the
    VAE, text encoders and sampling defaults of the `init_from` checkpoint, loaded on first use."""
    pipe: list[Any] = []

    def sample(params: Any) -> np.ndarray:
        # Outside the trainer's `jax.set_mesh`: the pipeline places its own arrays on `mesh` (or one device).
        with jax.set_mesh(None):
            if not pipe:
                from sd3_jax.pipeline import SD3Pipeline

                pipe.append(SD3Pipeline.load(init_from, mesh=mesh))
            p, adapters = pipe[0], ()
            if cfg.adapter == "lora":  # the params are the adapter on the checkpoint's transformer
                adapters = ((params, 1.0),)
            else:
                p.transformer_params = params
            size = cfg.sample_size or None
            return p.generate(
                list(cfg.sample_prompts),
                height=size,
                width=size,
                steps=cfg.sample_steps,
                seed=cfg.sample_seed,
                num_images_per_prompt=cfg.sample_images,
                adapters=adapters,
                progress=False,
            )

    return sample
