"""The training loop for one stage: precision, accumulation, checkpoints, exact resume, several GPUs.

    run_stage(cfg, out_dir, model)   # what `tinygptv train` and `tinygptv course` call

- Precision: bf16 autocast where the GPU has it, fp16 autocast + GradScaler where it does not,
  fp32 on the CPU. Frozen weights are stored in the low precision on a GPU; trained ones in fp32.
- The loss of a step is the mean over every answer token of the *global* batch (all processes, all
  accumulation steps). The original averages per micro-batch; averaging over tokens makes a split
  batch (accumulation, several GPUs) compute exactly what one big batch would.
- Data order is a pure function of (seed, step) (`MixtureSampler`), so a checkpoint's data position
  is its step, and resuming replays exactly the batches an uninterrupted run would see.
- Several processes (`torchrun --nproc_per_node N`): DistributedDataParallel, gloo on CPU, nccl on GPU.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..data.images import ImageLoadError, load_image, preprocess
from ..data.stages import MixtureSampler, Sample, SkipLog, load_datasets
from ..model.sequence import build_conversation_batch
from ..tokenizer import load_tokenizer
from .checkpoint import load_checkpoint, load_trainable, save_checkpoint, set_rng_state
from .config import StageConfig

LAST = "last.pt"  # rolling checkpoint for resume
FINAL = "final.pt"  # trainable weights at the end of the stage (the next stage starts from it)


class TrainingStopped(RuntimeError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups as in MiniGPT-4: no decay for biases, 1-D tensors and names containing 'ln'."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "bias" in n or "ln" in n else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def pick_precision(cfg: StageConfig, device: torch.device) -> torch.dtype:
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {cfg.precision!r}")
    if cfg.precision != "auto":
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
    if device.type != "cuda":
        return torch.float32
    # including_emulation=False: a T4 "supports" bf16 only by slow emulation; it gets fp16 + scaler
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


class FeatureCache:
    """Q-Former outputs per image key: the towers are frozen and there is no augmentation, so with
    `enabled` each image goes through the ViT and Q-Former once per stage."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.store: dict[str, torch.Tensor] = {}

    def has(self, key: str) -> bool:
        return self.enabled and key in self.store

    def queries(self, model, samples: list[Sample], pixels: dict[str, torch.Tensor], device) -> torch.Tensor | None:
        """Queries for the samples that have an image, in order; `pixels` holds the uncached ones."""
        fresh = {}
        if pixels:
            x = torch.stack(list(pixels.values())).to(device, dtype=next(model.vision.parameters()).dtype)
            q = model.encode_queries(x)
            fresh = {k: q[i].float() for i, k in enumerate(pixels)}
            if self.enabled:
                self.store.update(fresh)
        with_img = [s for s in samples if s.image is not None]
        if not with_img:
            return None
        return torch.stack([(self.store if s.key in self.store else fresh)[s.key] for s in with_img]).to(device)


class Trainer:
    def __init__(self, cfg: StageConfig, out_dir: str | Path, model, *, device: str | torch.device | None = None,
                 data_root: str | Path | None = None, show_progress: bool | None = None):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.model = model
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
        if device is None:
            if torch.cuda.is_available():
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            else:
                device = "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if cfg.batch_size % (self.world * cfg.grad_accum):
            raise ValueError(f"batch_size {cfg.batch_size} must divide into {self.world} processes x "
                             f"{cfg.grad_accum} accumulation steps")
        self.dtype = pick_precision(cfg, self.device)
        if show_progress is None:  # TQDM_DISABLE=1 (tests, notebooks under nbval) hides the bar
            show_progress = os.environ.get("TQDM_DISABLE", "").lower() not in ("1", "true", "yes")
        self.show_progress = show_progress and self.rank == 0
        self.tok = load_tokenizer()
        root = Path(data_root or cfg.data_root)
        self.skip_log = SkipLog()  # bad annotation records left out (skip_bad_samples only)
        self.datasets = load_datasets(root, cfg.datasets, cfg.template, cfg.seed,
                                      skip_log=self.skip_log if cfg.skip_bad_samples else None)
        if self.skip_log.total and self.rank == 0:
            print(f"stage {cfg.stage}: {self.skip_log.summary()}")
        self.sampler = MixtureSampler(self.datasets, {d["name"]: d.get("ratio", 1) for d in cfg.datasets}, cfg.seed)
        self.cache = FeatureCache(cfg.cache_image_features)
        self.skipped: Counter = Counter()
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.stop_requested = False

    # ------------------------------------------------------------------ set-up
    def _prepare_model(self):
        m = self.model
        m.set_stage(self.cfg.stage)
        if m.cfg.vision.img_size != self.cfg.image_size:
            m.vision.set_image_size(self.cfg.image_size)
        if self.dtype != torch.float32:
            m.cast_frozen(self.dtype)
        m.to(self.device)
        if self.cfg.grad_checkpointing:
            m.enable_gradient_checkpointing()
        m.train()
        self.ddp = None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(m, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.opt = torch.optim.AdamW(param_groups(m, self.cfg.weight_decay), lr=self.cfg.lr_at(0),
                                     betas=tuple(self.cfg.betas))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16 and self.device.type == "cuda")

    # ------------------------------------------------------------------ one step
    def _micro_batches(self, step: int) -> list[list[Sample]]:
        cfg = self.cfg
        samples = self.sampler.batch(step, cfg.batch_size, self.rank, self.world)
        k = len(samples) // cfg.grad_accum
        return [samples[i * k:(i + 1) * k] for i in range(cfg.grad_accum)]

    def _encode(self, samples: list[Sample]):
        """(text batch, queries) for a micro-batch. A bad sample raises an error naming its dataset
        and record, or (skip_bad_samples) is dropped and counted."""
        keep, pixels = [], {}
        for s in samples:
            try:
                if s.image is not None and s.key not in pixels and not self.cache.has(s.key):
                    pixels[s.key] = preprocess(load_image(s.image, name=s.key), self.cfg.image_size)
                build_conversation_batch(self.tok, [list(s.turns)], num_query_tokens=1, end_sym=self.cfg.end_sym,
                                         max_txt_len=self.cfg.max_txt_len, has_image=[s.image is not None])
                keep.append(s)
            except (ImageLoadError, ValueError, TypeError) as e:
                if not self.cfg.skip_bad_samples:
                    raise ValueError(f"dataset '{s.source}', record {s.key}: {e}") from e
                self.skipped[f"{s.source}: {type(e).__name__}"] += 1
        if not keep:
            return None, None
        queries = self.cache.queries(self.model, keep, pixels, self.device)
        batch = build_conversation_batch(self.tok, [list(s.turns) for s in keep],
                                         num_query_tokens=self.model.cfg.qformer.num_query_tokens,
                                         end_sym=self.cfg.end_sym, max_txt_len=self.cfg.max_txt_len)
        return batch.to(self.device), queries

    def _global_count(self, n: int) -> int:
        if self.world == 1:
            return n
        t = torch.tensor([n], dtype=torch.long, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return int(t.item())

    def train_step(self, step: int) -> dict:
        micro = [self._encode(s) for s in self._micro_batches(step)]
        micro = [(b, q) for b, q in micro if b is not None]
        local_targets = sum(int((b.targets[:, 1:] != -100).sum()) for b, _ in micro)
        total = self._global_count(local_targets)
        if total == 0:
            raise ValueError(f"step {step}: no target tokens in the global batch")
        for g in self.opt.param_groups:
            g["lr"] = self.cfg.lr_at(step)
        net = self.ddp or self.model
        loss_sum = 0.0
        autocast = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32 else nullcontext()
        for i, (b, q) in enumerate(micro):
            sync = nullcontext() if (self.ddp is None or i == len(micro) - 1) else self.ddp.no_sync()
            with sync, autocast:
                out = net(b, queries=q, reduction="sum")
            loss = out["loss"] * self.world / total  # DDP averages over processes: undo it
            self.scaler.scale(loss).backward()
            loss_sum += float(out["loss"].detach())
        if self.world > 1:
            t = torch.tensor([loss_sum], dtype=torch.float64)
            dist.all_reduce(t)
            loss_sum = float(t.item())
        mean_loss = loss_sum / total
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.opt)
        grads_ok = all(torch.isfinite(p.grad).all() for p in self.model.parameters() if p.grad is not None)
        if not math.isfinite(mean_loss) or not grads_ok:
            self.opt.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():
                self.scaler.update()
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
            if self.nonfinite_in_row >= self.cfg.max_nonfinite_in_row:
                raise TrainingStopped(f"stage {self.cfg.stage}: {self.nonfinite_in_row} steps in a row had a "
                                      f"non-finite loss or gradient (last at step {step}); stopping. Lower the "
                                      "learning rate or use bf16/fp32.")
            return {"step": step, "loss": mean_loss, "skipped_step": True}
        self.nonfinite_in_row = 0
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        return {"step": step, "loss": mean_loss, "lr": self.cfg.lr_at(step), "targets": total}

    # ------------------------------------------------------------------ the loop
    def save(self, step: int, name: str = LAST) -> None:
        if self.rank != 0:
            return
        save_checkpoint(self.out / name, model=self.model, optimizer=self.opt, step=step,
                        preset=self.model.cfg.preset, stage=self.cfg.stage, config=self.cfg.to_dict(),
                        scaler=self.scaler, extra={"nonfinite_total": self.nonfinite_total,
                                                   "skipped": dict(self.skipped)})

    def _resume(self) -> int:
        path = self.out / LAST
        if not path.exists():
            return 0
        ck = load_checkpoint(path, preset=self.model.cfg.preset, stage=self.cfg.stage)
        load_trainable(self.model, ck["trainable"], str(path))
        self.opt.load_state_dict(ck["optimizer"])
        if ck.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ck["scaler"])
        set_rng_state(ck["rng"])
        self.nonfinite_total = ck["extra"].get("nonfinite_total", 0)
        self.skipped.update(ck["extra"].get("skipped", {}))
        return int(ck["step"])

    def _on_sigint(self, signum, frame):
        self.stop_requested = True

    def run(self, resume: bool = False) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        seed_everything(self.cfg.seed + self.rank)
        self._prepare_model()
        start = self._resume() if resume else 0
        metrics_path = self.out / "metrics.jsonl"
        if start == 0 and self.rank == 0 and metrics_path.exists():
            metrics_path.unlink()
        old_handler = signal.signal(signal.SIGINT, self._on_sigint) if _main_thread() else None
        total = self.cfg.total_steps
        bar = tqdm(total=total, initial=start, desc=f"stage {self.cfg.stage}", disable=not self.show_progress)
        t0 = time.time()
        step = start
        try:
            for step in range(start, total):
                rec = self.train_step(step)
                rec["time"] = round(time.time() - t0, 3)
                if self.rank == 0:
                    with open(metrics_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(rec) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}")
                done = step + 1
                if self.stop_requested:
                    self.save(done)
                    raise KeyboardInterrupt(f"interrupted: checkpoint saved at step {done} in {self.out / LAST}")
                if done % self.cfg.checkpoint_every == 0 or done == total:
                    self.save(done)
        finally:
            bar.close()
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
        if self.rank == 0:
            self.save(total, FINAL)
            plot_loss(metrics_path, self.out / "loss.png", title=f"stage {self.cfg.stage}")
        if self.skipped and self.rank == 0:
            print(f"stage {self.cfg.stage}: skipped samples: {dict(self.skipped)}")
        return {"steps": total, "resumed_from": start, "seconds": time.time() - t0,
                "nonfinite_steps": self.nonfinite_total, "skipped": dict(self.skipped),
                "skipped_records": dict(self.skip_log.counts), **read_losses(metrics_path)}


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def read_losses(metrics_path: Path, window: int = 20) -> dict:
    if not Path(metrics_path).exists():
        return {}
    losses = [json.loads(line)["loss"] for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    losses = [x for x in losses if math.isfinite(x)]
    if not losses:
        return {}
    w = max(1, min(window, len(losses) // 4))  # mean of the first / last quarter, at most `window` steps
    return {"first_loss": sum(losses[:w]) / w, "final_loss": sum(losses[-w:]) / w}


def plot_loss(metrics_path: Path, png: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(5, 3), dpi=80)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
