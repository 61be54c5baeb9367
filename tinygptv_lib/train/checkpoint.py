"""Training checkpoints: trainable weights + optimizer + RNG + step, written atomically.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over
the old one (`os.replace` is atomic), so a process killed at any moment leaves the last good
checkpoint readable. Loading uses `torch.load(weights_only=True)`: no pickled code ever runs.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

FORMAT = "tinygptv-train-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; the message names the file and the reason."""


def atomic_save(obj, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(path, *, model, optimizer, step: int, preset: str, stage: int, config: dict,
                    scaler=None, extra: dict | None = None) -> Path:
    obj = {
        "format": FORMAT,
        "version": VERSION,
        "preset": preset,
        "stage": stage,
        "step": step,
        "trainable": {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": rng_state(),
        "config": config,
        "extra": extra or {},
    }
    return atomic_save(obj, path)


def load_checkpoint(path, *, preset: str | None = None, stage: int | None = None) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, code-running pickle (refused)
        raise CheckpointError(f"{path}: cannot be read as a training checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} file (format={obj.get('format') if isinstance(obj, dict) else None!r})")
    if preset is not None and obj["preset"] != preset:
        raise CheckpointError(f"{path}: checkpoint of preset '{obj['preset']}', but this run is preset '{preset}'")
    if stage is not None and obj["stage"] != stage:
        raise CheckpointError(f"{path}: checkpoint of stage {obj['stage']}, but this run is stage {stage}")
    return obj


def load_trainable(model, state: dict[str, torch.Tensor], source: str, strict: bool = True) -> list[str]:
    """Copy trainable weights in; returns names the model wants but the state lacks (strict=False)."""
    params = dict(model.named_parameters())
    unexpected = sorted(set(state) - set(params))
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in state)
    shape = [f"{n}: model {tuple(params[n].shape)}, checkpoint {tuple(t.shape)}"
             for n, t in state.items() if n in params and tuple(params[n].shape) != tuple(t.shape)]
    if unexpected or shape or (strict and missing):
        lines = [f"{source}: checkpoint does not match the model"]
        lines += [f"  unexpected key: {n}" for n in unexpected[:20]]
        lines += [f"  missing key: {n}" for n in missing[:20]] if strict else []
        lines += [f"  shape mismatch: {s}" for s in shape[:20]]
        raise CheckpointError("\n".join(lines))
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].dtype))
    return missing
