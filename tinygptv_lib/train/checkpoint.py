"""Training checkpoints: trainable weights + optimizer + RNG + step, written atomically.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over
the old one (`os.replace` is atomic), so a process killed at any moment leaves the last good
checkpoint readable. Loading uses `torch.load(weights_only=True)`: no pickled code ever runs.
"""
from __future__ import annotations

import glob
import os
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

FORMAT = "tinygptv-train-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; the message names the file and the reason."""


def atomic_save(obj, path: str | Path) -> Path:
    """torch.save to a temporary file beside `path`, fsync, then rename over `path`.

    A process killed mid-save leaves its temporary file behind (never a half-written `path`); the
    next save of the same path removes such leftovers."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            stale.unlink()
        except OSError:
            pass
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # the rename itself survives a power cut
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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


_REQUIRED = ("preset", "stage", "step", "trainable")


def load_checkpoint(path, *, preset: str | None = None, stage: int | None = None,
                    up_to_stage: int | None = None) -> dict:
    """Read a training checkpoint, refusing anything that is not one, or not the one expected.

    preset / stage: the run's; a checkpoint of another preset or stage is refused (resume).
    up_to_stage: the checkpoint's stage may not be later than this (a stage starts from an earlier
    stage's final.pt; a stage-4 model can hold any stage's weights, as evaluation does).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint" + (" (it is a folder)" if path.is_dir() else ""))
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes); a save was interrupted before this project wrote "
                              "checkpoints atomically, or the file was copied incompletely")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, code-running pickle (refused)
        text = str(e)
        if "Weights only load failed" in text or "weights_only" in text:
            found = re.search(r"GLOBAL ([\w.]+)", text)
            what = f" (it asks for {found.group(1)})" if found else ""
            why = f"refused: loading it would run code from the file{what}; only weights_only loading is allowed"
        else:
            first = (text.splitlines() or [""])[0][:160]
            kind = "truncated or damaged file" if "zip" in text.lower() or "eof" in text.lower() else \
                "not a torch checkpoint"
            why = f"{kind} ({type(e).__name__}: {first})"
        raise CheckpointError(f"{path}: cannot be read as a training checkpoint: {why}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        hint = ""
        if isinstance(obj, dict) and "model" in obj:
            hint = ("; it looks like a released TinyGPT-V checkpoint: load it with "
                    "tinygptv_lib.weights.load_release_checkpoint")
        raise CheckpointError(f"{path}: not a {FORMAT} file (format="
                              f"{obj.get('format') if isinstance(obj, dict) else None!r}){hint}")
    if obj.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}: written by a newer version of this project (checkpoint version "
                              f"{obj['version']}, this code reads up to {VERSION})")
    lacking = [k for k in _REQUIRED if k not in obj]
    if lacking:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(lacking)}")
    if preset is not None and obj["preset"] != preset:
        raise CheckpointError(f"{path}: checkpoint of preset '{obj['preset']}', but this run is preset '{preset}'")
    if stage is not None and obj["stage"] != stage:
        raise CheckpointError(f"{path}: checkpoint of stage {obj['stage']}, but this run is stage {stage}")
    if up_to_stage is not None and obj["stage"] > up_to_stage:
        raise CheckpointError(f"{path}: checkpoint of stage {obj['stage']}, but this model is for stage "
                              f"{up_to_stage}; a stage starts from an earlier stage's final.pt "
                              f"(expected stage {max(1, up_to_stage - 1)})")
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
