"""Reading weight files safely and applying renamed tensors to the model with one clear error.

Every loader in this package works in three steps:

1. read the source (`read_state_dict`): a `.safetensors` file, a Hugging Face folder (one file or
   shards listed in `model.safetensors.index.json`), or a pickled `.pth` / `.bin` that is opened
   **only** with `torch.load(..., weights_only=True)`. A pickle that would need to run code is
   refused with `UnsafeCheckpointError`; nothing in it is executed.
2. map the source names to ours (`Mapped`): every source key is either renamed (possibly merged,
   split or resized), knowingly ignored (listed in the report), or left unmapped (an error).
3. apply (`apply_state_dict`): check the mapped tensors against the model and raise one
   `WeightLoadError` that lists every missing key, unexpected key and shape mismatch together with
   the source file, or load them. Targets on the meta device are loaded by assignment, so the
   full-size model can be filled without ever allocating its random initialisation.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

_MAX_LISTED = 40  # per category in an error message; the full lists stay on the exception


class WeightLoadError(ValueError):
    """Weights could not be loaded; the message lists every problem and names the source."""

    def __init__(self, message: str, *, source: str | None = None, missing: Iterable[str] = (),
                 unexpected: Iterable[str] = (), mismatched: Iterable[tuple] = ()):
        super().__init__(message)
        self.source = source
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


class UnsafeCheckpointError(WeightLoadError):
    """A pickled checkpoint needs arbitrary Python objects to load; it was refused, nothing ran."""


# ----------------------------------------------------------------------------------- reading
def _load_pickle(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(
            f"refused to load {path}: this pickle asks for Python objects other than tensors and plain "
            f"containers, which could run arbitrary code. Only weights-only pickles are read "
            f"(torch.load(..., weights_only=True)); nothing from the file was executed. "
            f"torch said: {first}", source=str(path)) from None


def _load_safetensors(path: Path, keep: Callable[[str], bool] | None,
                      skipped: list[str] | None = None) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():
            if keep is None or keep(key):
                out[key] = f.get_tensor(key)
            elif skipped is not None:
                skipped.append(key)
    return out


def _load_sharded(index_path: Path, keep: Callable[[str], bool] | None,
                  skipped: list[str] | None = None) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise WeightLoadError(f"cannot read the shard index {index_path}: {e}", source=str(index_path)) from None
    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        if keep is None or keep(key):
            by_shard.setdefault(shard, []).append(key)
        elif skipped is not None:
            skipped.append(key)
    out: dict[str, torch.Tensor] = {}
    for shard, keys in by_shard.items():
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise WeightLoadError(f"{index_path} lists shard {shard!r}, but {shard_path} does not exist "
                                  "(incomplete download?)", source=str(index_path))
        if shard.endswith(".safetensors"):
            tensors = _load_safetensors(shard_path, lambda k, want=set(keys): k in want)
        else:
            tensors = extract_model_state(_load_pickle(shard_path), str(shard_path))
        absent = [k for k in keys if k not in tensors]
        if absent:
            raise WeightLoadError(f"{index_path} says shard {shard!r} holds {len(absent)} key(s) it does not "
                                  f"contain, e.g. {absent[:5]}", source=str(index_path), missing=absent)
        out.update({k: tensors[k] for k in keys})
    return out


_FOLDER_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                 "pytorch_model.bin")


def extract_model_state(obj, where: str) -> dict[str, torch.Tensor]:
    """The tensor dict of a loaded checkpoint: `obj["model"]` (LAVIS / MiniGPT-4 / TinyGPT-V
    checkpoints), `obj["state_dict"]`, or `obj` itself when it is already a flat state dict."""
    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        if not obj:
            return {}
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)][:5]
        raise WeightLoadError(f"{where}: no state dict found: the top level has keys {sorted(obj)[:10]} and "
                              f"non-tensor entries such as {bad}; expected a dict of tensors or one under "
                              "'model'", source=where)
    raise WeightLoadError(f"{where}: expected a dict of tensors, got {type(obj).__name__}", source=where)


def read_checkpoint(path: str | os.PathLike):
    """The raw object in a weights file (a `.pth` dict with 'model', 'optimizer', ...; or a tensor
    dict for `.safetensors`). Pickles are read weights-only."""
    path = Path(path)
    if not path.is_file():
        raise WeightLoadError(f"weights file {path} does not exist", source=str(path))
    if path.suffix == ".safetensors":
        return _load_safetensors(path, None)
    return _load_pickle(path)


def read_state_dict(path: str | os.PathLike, keep: Callable[[str], bool] | None = None,
                    skipped: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors from a file or a Hugging Face folder, optionally only the keys for which `keep` is true
    (safetensors shards without a wanted key are not even opened; the names of keys not read are
    appended to `skipped`)."""
    path = Path(path)
    if path.is_dir():
        for name in _FOLDER_FILES:
            f = path / name
            if f.is_file():
                if name.endswith(".index.json"):
                    return _load_sharded(f, keep, skipped)
                return read_state_dict(f, keep, skipped)
        raise WeightLoadError(f"{path} is a folder without weights: looked for {', '.join(_FOLDER_FILES)}",
                              source=str(path))
    if not path.is_file():
        raise WeightLoadError(f"weights file {path} does not exist", source=str(path))
    if path.suffix == ".safetensors":
        return _load_safetensors(path, keep, skipped)
    return _filter(extract_model_state(_load_pickle(path), str(path)), keep, skipped)


def _filter(sd, keep, skipped):
    if keep is None:
        return sd
    if skipped is not None:
        skipped += [k for k in sd if not keep(k)]
    return {k: v for k, v in sd.items() if keep(k)}


def resolve_source(source, keep: Callable[[str], bool] | None = None,
                   skipped: list[str] | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, a name for messages) from a path or an in-memory state dict / checkpoint dict."""
    if isinstance(source, Mapping):
        return _filter(extract_model_state(source, "<in-memory state dict>"), keep, skipped), "<in-memory state dict>"
    return read_state_dict(source, keep, skipped), str(source)


# ----------------------------------------------------------------------------------- mapping
@dataclass
class Mapped:
    """Source tensors renamed to our parameter names, and what happened to every source key."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # our key -> the source key(s) it came from
    ignored: list[str] = field(default_factory=list)  # source keys knowingly not used
    unmapped: list[str] = field(default_factory=list)  # source keys with no place in our model
    problems: list[str] = field(default_factory=list)  # anything else that makes the load wrong

    def put(self, key: str, tensor: torch.Tensor, origin: str) -> None:
        if key in self.tensors:
            self.problems.append(f"{key} would be set twice: from {self.origin[key]} and from {origin}")
            return
        self.tensors[key] = tensor
        self.origin[key] = origin

    def rename(self, old: str, new: str) -> None:
        self.tensors[new] = self.tensors.pop(old)
        self.origin[new] = self.origin.pop(old)

    def merge(self, other: "Mapped") -> None:
        for k, t in other.tensors.items():
            self.put(k, t, other.origin[k])
        self.ignored += other.ignored
        self.unmapped += other.unmapped
        self.problems += other.problems


Rule = tuple[str, "str | None"]  # (regex on the source key, replacement template; None = ignore)


def apply_rules(sd: Mapping[str, torch.Tensor], rules: Iterable[Rule],
                fallback: Callable[[str, torch.Tensor, Mapped], bool] | None = None) -> Mapped:
    """Rename with the first matching rule; `fallback(key, tensor, mapped)` may claim the rest."""
    compiled = [(re.compile(p), r) for p, r in rules]
    out = Mapped()
    for key, tensor in sd.items():
        for pattern, repl in compiled:
            m = pattern.fullmatch(key)
            if m:
                if repl is None:
                    out.ignored.append(key)
                else:
                    out.put(m.expand(repl), tensor, key)
                break
        else:
            if fallback is None or not fallback(key, tensor, out):
                out.unmapped.append(key)
    return out


# ----------------------------------------------------------------------------------- applying
@dataclass
class LoadReport:
    """What a loader did: the model keys it set and the source keys it knowingly ignored."""

    source: str
    loaded: list[str]
    ignored: list[str]

    def __str__(self) -> str:
        return f"{self.source}: loaded {len(self.loaded)} tensors, ignored {len(self.ignored)} source keys"


def _listing(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    lines = [f"  {title} [{len(items)}]:"] + [f"    - {x}" for x in items[:_MAX_LISTED]]
    if len(items) > _MAX_LISTED:
        lines.append(f"    ... and {len(items) - _MAX_LISTED} more")
    return lines


def _tied_groups(module: nn.Module) -> list[list[str]]:
    by_id: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _set_param(module: nn.Module, name: str, param: nn.Parameter) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    setattr(owner, leaf, param)


def apply_state_dict(module: nn.Module, mapped: Mapped | Mapping[str, torch.Tensor], source: str, *,
                     required: Iterable[str] | None = None, assign: bool | None = None) -> LoadReport:
    """Load `mapped` into `module`, or raise one `WeightLoadError` listing every problem.

    required: the model keys this source must provide (default: every key of the module). Keys not
        required and not given keep their current values.
    assign: replace the module's tensors instead of copying into them (default: when a target is
        on the meta device). Floating tensors are cast to the target's dtype either way, and
        `requires_grad` stays the module's.
    """
    if not isinstance(mapped, Mapped):
        mapped = Mapped(tensors=dict(mapped), origin={k: k for k in mapped})
    target = module.state_dict()
    given = mapped.tensors
    tied = _tied_groups(module)
    alias = {n: g for g in tied for n in g}

    required = list(target) if required is None else list(required)
    missing = sorted(k for k in required if k not in given and not any(a in given for a in alias.get(k, ())))
    unexpected = [k if mapped.origin.get(k, k) == k else f"{k} (from {mapped.origin[k]})"
                  for k in given if k not in target]
    unexpected += [f"{k} (source key with no place in this model)" for k in mapped.unmapped]
    mismatched = [(k, tuple(target[k].shape), tuple(t.shape), mapped.origin.get(k, k))
                  for k, t in given.items() if k in target and tuple(t.shape) != tuple(target[k].shape)]
    problems = list(mapped.problems)
    for group in tied:
        present = [n for n in group if n in given]
        if len(present) > 1:
            first = given[present[0]]
            for other in present[1:]:
                t = given[other]
                if first.device.type != "meta" and t.device.type != "meta" and (
                        first.shape != t.shape or not torch.equal(first.to(t.dtype), t)):
                    problems.append(f"{present[0]} and {other} are one tied parameter in this model, "
                                    "but the source gives them different values")
    if missing or unexpected or mismatched or problems:
        lines = [f"could not load weights from {source} into {type(module).__name__}:"]
        lines += _listing("missing keys (the model needs them; the source does not provide them)", missing)
        lines += _listing("unexpected keys (the source has them; the model has no place for them)", unexpected)
        lines += _listing("shape mismatches", [f"{k}: model expects {tuple(e)}, source has {tuple(g)}"
                                               + (f" (from {o})" if o != k else "")
                                               for k, e, g, o in mismatched])
        lines += _listing("other problems", problems)
        raise WeightLoadError("\n".join(lines), source=source, missing=missing, unexpected=unexpected,
                              mismatched=mismatched)

    if assign is None:
        assign = any(target[k].device.type == "meta" for k in given)
    sd = {}
    for k, t in given.items():
        ref = target[k]
        if t.is_floating_point() and ref.is_floating_point() and t.dtype != ref.dtype:
            t = t.to(ref.dtype)
        if assign and ref.device.type != "meta" and t.device != ref.device:
            t = t.to(ref.device)
        sd[k] = t
    with torch.no_grad():
        result = module.load_state_dict(sd, strict=False, assign=assign)
    assert not result.unexpected_keys, result.unexpected_keys  # checked above
    if assign:  # assignment replaces Parameters one name at a time: put tied ones back together
        for group in tied:
            present = [n for n in group if n in given]
            if present:
                p = module.get_parameter(present[0])
                for other in group:
                    if other != present[0]:
                        _set_param(module, other, p)
    return LoadReport(source=source, loaded=sorted(given), ignored=list(mapped.ignored))
