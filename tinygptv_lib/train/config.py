"""Per-stage training settings, one YAML file per stage and preset (`tinygptv_lib/configs/`).

The full-size files mirror the original TinyGPT-V recipe; every number in a nano file has its
full-size value in a comment beside it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class StageConfig:
    stage: int
    preset: str
    datasets: list = field(default_factory=list)  # [{name, kind, path, ratio, ...}]
    data_root: str = "data_samples"  # relative paths resolve against the repository / cwd
    image_size: int = 224
    template: str | None = None  # None (stages 1-2), "###Human: {} ###Assistant: ", "[INST] {} [/INST]"
    end_sym: str = "\n"
    max_txt_len: int = 32
    batch_size: int = 64  # global batch (all processes, all accumulation steps)
    grad_accum: int = 1
    epochs: int = 1
    iters_per_epoch: int = 5000
    lr_init: float = 1e-4
    lr_min: float = 8e-5
    warmup_start_lr: float = 1e-6
    warmup_steps: int = 1000
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.999)
    seed: int = 42
    precision: str = "auto"  # auto: bf16 on a GPU that has it, else fp16 + grad scaler; fp32 on CPU
    grad_checkpointing: bool = False
    cache_image_features: bool = False  # frozen towers + no augmentation: compute once per image
    checkpoint_every: int = 1000
    skip_bad_samples: bool = False
    max_nonfinite_in_row: int = 10

    @property
    def total_steps(self) -> int:
        return self.epochs * self.iters_per_epoch

    def lr_at(self, step: int) -> float:
        """Linear warm-up from warmup_start_lr to lr_init, then cosine from lr_init to lr_min (per step)."""
        if step < self.warmup_steps:
            return self.warmup_start_lr + (self.lr_init - self.warmup_start_lr) * step / max(1, self.warmup_steps)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.lr_min + (self.lr_init - self.lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_stage_config(stage: int | None = None, preset: str | None = None, path: str | Path | None = None,
                      overrides: dict | None = None) -> StageConfig:
    """The shipped config for (stage, preset), or a YAML file of your own (`--config FILE`)."""
    if path is None:
        if stage is None or preset is None:
            raise ValueError("give a stage and a preset, or a config file")
        path = CONFIG_DIR / preset / f"stage{stage}.yaml"
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"stage config {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    data.update(overrides or {})
    known = {f.name for f in dataclasses.fields(StageConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {unknown}; expected some of {sorted(known)}")
    for required in ("stage", "preset"):
        if required not in data:
            raise ValueError(f"{path}: missing setting '{required}'")
    if "betas" in data:
        data["betas"] = tuple(data["betas"])
    cfg = StageConfig(**data)
    if cfg.batch_size % cfg.grad_accum:
        raise ValueError(f"{path}: batch_size {cfg.batch_size} is not divisible by grad_accum {cfg.grad_accum}")
    return cfg
