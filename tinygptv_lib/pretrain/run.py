"""One reproducible run: pretrain both backbones, write them, measure them from the written files.

    python -m tinygptv_lib.pretrain --out tinygptv_lib/assets/nano_backbones --seed 0

Phases, in order: dense (the ViT alone), vision (ViT + Q-Former, BLIP-2's losses), language (Phi
from scratch), reading (Phi on from the language phase: lookup drills). `--part` reruns some of them;
`--part seeing` adds Phi's third phase on the towers of a folder (`seeing_stage.py`).

Steps, not seconds, fix the length of the run, so the same seed on the same machine (and thread
count) gives the same weights and the same quality numbers; only the timings change.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config import TinyGPTVConfig, get_config
from ..model.tinygptv import build_model
from ..tokenizer import load_tokenizer
from ..weights.nano import BLIP2_FILE, load_nano_backbones
from . import evaluate as E
from . import export
from .common import seed_everything, set_threads
from .dense_stage import DenseSettings, train_dense
from .heads import CompactVocab
from .language_stage import LanguageSettings, heldout_documents, reading_settings, train_language
from .seeing_stage import SeeingSettings, train_seeing
from .vision_stage import VisionPretrainer, VisionSettings, build_vocab, heldout_scenes, scene_pixels, train_vision

CONFIG_FILE = "config.json"
QUALITY_FILE = "quality.json"
SEEING_FILE = "seeing_projection.safetensors"  # the seeing phase's throw-away projection (measuring only)


@dataclass
class PretrainSettings:
    dense: DenseSettings = field(default_factory=DenseSettings)
    vision: VisionSettings = field(default_factory=VisionSettings)
    language: LanguageSettings = field(default_factory=LanguageSettings)
    reading: LanguageSettings = field(default_factory=reading_settings)  # Phi's second phase, on from `language`
    seeing: SeeingSettings = field(default_factory=SeeingSettings)  # Phi's third phase (--part seeing only)
    eval_images: int = 200  # retrieval among this many held-out captions (chance = 1 / eval_images)
    eval_documents: int = 200
    eval_sheets: int = 40  # held-out course scenes for sheet_reading (each gives up to 4 items)


def _progress(total: int, enabled: bool):
    """One bar over both runs; TQDM_DISABLE=1 (tests, notebooks under nbval) hides it."""
    from tqdm.auto import tqdm

    hidden = os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    return tqdm(total=total, desc="pretraining", unit="step", disable=hidden or not enabled)


PARTS = ("all", "vision", "language", "reading", "seeing")
# What each part trains (the rest is kept as written in `out`); "reading" and "seeing" continue the
# Phi in `out`. "all" stops before seeing: that phase fits Phi to the queries of the towers it is run on.
TRAINS = {"all": ("dense", "vision", "language", "reading"), "vision": ("dense", "vision"),
          "language": ("language", "reading"), "reading": ("reading",), "seeing": ("seeing",)}


def _steps(settings: "PretrainSettings", name: str) -> int:
    phase = getattr(settings, name)
    return phase.total_steps if isinstance(phase, SeeingSettings) else phase.steps


def pretrain(out: str | Path, seed: int = 0, cfg: TinyGPTVConfig | None = None,
             settings: PretrainSettings | None = None, threads: int | None = None, progress: bool = True,
             part: str = "all", flags: str = "") -> dict:
    """Pretrain, write every file under `out`, and return the quality measured from those files.

    part: "all" trains both towers; "vision" (ViT + Q-Former) or "language" (Phi, both its phases)
    retrains one and keeps the other as already written in `out` by a run with the same seed and
    settings for it; "reading" runs only Phi's second phase, on from a first-phase Phi in `out`;
    "seeing" runs Phi's third phase on the towers and the read-trained Phi in `out` (whatever
    recipe made them: the folder's config.json keeps its settings for them).
    flags: the command line's recipe options (`cli.recipe_flags`), written into `made_by` so that
    the chain of commands there remakes the files.
    """
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    out = Path(out)
    cfg = cfg or get_config("nano")
    settings = settings or PretrainSettings()
    trained = TRAINS[part]
    kept_parts = tuple(n for n in TRAINS["all"] if n not in trained)  # not retrained
    before = _previous_run(out, seed, settings, () if part == "seeing" else kept_parts) if kept_parts else None
    phases_before = _phi_phases(before["config"]) if before else []
    if part in ("vision", "reading") and "seeing" in phases_before:
        raise ValueError(f"{out / CONFIG_FILE}: this Phi was fitted to the queries of the towers in {out} "
                         "(--part seeing); run --part language (then --part seeing) instead")
    if part == "reading" and "reading" in phases_before:
        raise ValueError(f"{out / CONFIG_FILE}: this Phi has had its reading phase already; run --part language "
                         "to train both phases again")
    if part == "seeing" and (phases_before[-1:] != ["reading"]):
        raise ValueError(f"{out / CONFIG_FILE}: the seeing phase continues a Phi after its reading phase, this one "
                         f"has had {phases_before}; run --part language to train Phi again first")
    threads = set_threads(threads)
    tokenizer = load_tokenizer()
    start = time.perf_counter()
    train_vision_part, train_language_part = "vision" in trained, "language" in trained
    bar = _progress(sum(_steps(settings, n) for n in trained), progress)

    def tick(stage: str):
        def on_step(losses: dict) -> None:
            bar.set_postfix({"stage": stage, **{k: f"{v:.3f}" for k, v in losses.items()}}, refresh=False)
            bar.update(1)
        return on_step

    seconds, losses = {}, {}
    if train_vision_part:
        seed_everything(seed)
        vit, dense_history = None, []
        if settings.dense.steps:
            vit, dense_history = train_dense(cfg, settings.dense, seed, tick("dense"))
        seconds["dense"] = round(time.perf_counter() - start, 1)
        seed_everything(seed)
        vocab = build_vocab(tokenizer)
        vision_model, vision_history = train_vision(cfg, settings.vision, seed, tokenizer, vocab, tick("vision"),
                                                    vision=vit)
        seconds["vision"] = round(time.perf_counter() - start - seconds["dense"], 1)
        if dense_history:
            losses.update(dense_first=dense_history[0], dense_last_50=_mean(dense_history[-50:]))
        losses.update(vision_first=vision_history[0], vision_last_50=_mean(vision_history[-50:]))
    else:
        vision_model, vocab = load_heads(out, cfg)
    if train_language_part:
        t0 = time.perf_counter()
        seed_everything(seed)
        phi, language_history = train_language(cfg, settings.language, seed, tokenizer, tick("language"))
        seconds["language"] = round(time.perf_counter() - t0, 1)
        losses.update(language_first=language_history[0]["loss"],
                      language_last_50=_mean(language_history[-50:])["loss"])
    else:
        tower = build_model(cfg, stage=None)
        load_nano_backbones(tower, out)
        phi = tower.phi
    if "reading" in trained and settings.reading.steps:
        t0 = time.perf_counter()
        with torch.no_grad():  # start from the first phase's Phi as written (rounded to the storage dtype),
            for p in phi.parameters():  # so one run and `--part reading` on its files give the same weights
                p.copy_(p.to(export.STORE_DTYPE))
        seed_everything(seed)
        phi, reading_history = train_language(cfg, settings.reading, seed, tokenizer, tick("reading"), phi=phi)
        seconds["reading"] = round(time.perf_counter() - t0, 1)
        losses.update(reading_first=reading_history[0]["loss"], reading_last_50=_mean(reading_history[-50:])["loss"])
    if "seeing" in trained:
        t0 = time.perf_counter()
        seed_everything(seed)
        seeing_history = train_seeing(tower, settings.seeing, seed, tokenizer, tick("seeing"))
        phi = tower.phi
        seconds["seeing"] = round(time.perf_counter() - t0, 1)
        losses.update(seeing_first=seeing_history[0]["loss"], seeing_last_50=_mean(seeing_history[-50:])["loss"])
    bar.close()

    sizes = export.write_backbones(out, cfg, vision_model, phi, vocab)
    command = (f"python -m tinygptv_lib.pretrain --out {out} --seed {seed}" + (f" {flags}" if flags else "")
               + ("" if part == "all" else f" --part {part}"))  # --part last: later runs find what they replace
    replaced = tuple(f"--part {p}" for p in PARTS if set(TRAINS[p]) <= set(trained))
    if train_language_part:  # a new Phi: the seeing phase of the old one is gone with it
        replaced += ("--part seeing",)
    earlier = [] if before is None else [c for c in before["config"]["made_by"].split(" && ")
                                          if not c.endswith(replaced)]  # what this run replaces goes
    made_by = " && ".join(earlier + [command])
    if part == "seeing":
        phases = phases_before + ["seeing"]
        export.save_tensors(tower.projection.state_dict(), out / SEEING_FILE)
        recipe = {**before["config"]["pretraining"], "seeing": dataclasses.asdict(settings.seeing)}
    else:
        phases = [n for n in ("language", "reading") if getattr(settings, n).steps and
                  (n in trained or n in phases_before)]
        (out / SEEING_FILE).unlink(missing_ok=True)  # no Phi here has seen through it
        recipe = dataclasses.asdict(settings)
        recipe.pop("seeing")
    (out / CONFIG_FILE).write_text(json.dumps({
        "made_by": made_by, "seed": seed, "model": cfg.to_dict(), "pretraining": recipe,
        "phi_phases": phases,
    }, indent=2) + "\n")
    quality = measure(out, cfg, settings)
    old = before["quality"] if before else {}
    steps = {n: _steps(settings, n) for n in TRAINS["all"]}
    batch = {n: getattr(settings, n).batch for n in TRAINS["all"]}
    if part == "seeing":  # the kept parts' numbers are those of the runs that made them
        steps, batch = {**steps, **old.get("steps", {})}, {**batch, **old.get("batch", {})}
    if "seeing" in phases:
        steps["seeing"], batch["seeing"] = _steps(settings, "seeing"), settings.seeing.batch
    if before:  # the kept part's seconds and losses come from the run that trained it
        for name in kept_parts:
            seconds[name] = old.get("seconds", {}).get(name)
        losses = {**{k: v for k, v in old.get("training_loss", {}).items() if k.startswith(kept_parts)}, **losses}
    seconds["total_with_evaluation"] = round(time.perf_counter() - start, 1)
    quality.update({
        "seed": seed, "threads": threads, "torch_version": torch.__version__, "part": part,
        "steps": steps, "batch": batch, "seconds": seconds, "training_loss": losses,
        "file_bytes": sizes, "storage_dtype": str(export.STORE_DTYPE).replace("torch.", ""),
    })
    (out / QUALITY_FILE).write_text(json.dumps(quality, indent=2) + "\n")
    return quality


def _previous_run(out: Path, seed: int, settings: PretrainSettings, kept_parts: tuple[str, ...]) -> dict:
    """The config and quality of the run whose files a one-part run keeps; its seed and its
    settings for the kept part must be this run's (else the folder would mix two recipes)."""
    try:
        config = json.loads((out / CONFIG_FILE).read_text())
        quality = json.loads((out / QUALITY_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{out}: a one-part run keeps the other part's files, but {out / CONFIG_FILE} or "
                         f"{out / QUALITY_FILE} is missing or unreadable ({e}); run with --part all first") from e
    if config.get("seed") != seed:
        raise ValueError(f"{out / CONFIG_FILE}: seed {config.get('seed')} was used for the kept files, not {seed}")
    now = json.loads(json.dumps(dataclasses.asdict(settings)))  # tuples as JSON lists, as written
    defaults = json.loads(json.dumps(dataclasses.asdict(PretrainSettings())))
    for name in kept_parts:
        if name == "reading" and "reading" not in _phi_phases(config):
            continue  # the kept Phi never had a reading phase: nothing of it to match
        written = config.get("pretraining", {}).get(name)
        # a field added after the folder was written counts at its default (the recipe it was made with)
        if written is None or {**defaults[name], **written} != now[name]:
            raise ValueError(f"{out / CONFIG_FILE}: pretraining.{name} differs from the settings of this run; "
                             f"the kept files were made with {written}")
    return {"config": config, "quality": quality}


def _phi_phases(config: dict) -> list[str]:
    """Which of Phi's phases made the Phi of a folder (folders from before the reading phase: the first)."""
    return config.get("phi_phases", ["language"])


def _mean(history: list[dict]) -> dict:
    return {k: round(sum(h[k] for h in history) / len(history), 4) for k in history[0]}


# --------------------------------------------------------------------------- measuring the written files


def load_heads(folder: str | Path, cfg: TinyGPTVConfig | None = None) -> tuple[VisionPretrainer, CompactVocab]:
    """The pretraining model rebuilt from the written files: towers through the real loaders, the
    throw-away heads from `pretraining_heads.safetensors` (for measuring and looking inside).

    `cfg` defaults to the preset named in the folder's config.json (pass it for other numbers).
    """
    folder = Path(folder)
    info = json.loads((folder / CONFIG_FILE).read_text())
    cfg = cfg or get_config(info["model"]["preset"])  # the loaders check every shape against it
    vs = VisionSettings(**info["pretraining"]["vision"])
    heads = load_file(str(folder / export.HEADS_FILE))
    vocab = CompactVocab(heads.pop("vocab_ids").tolist())
    model = VisionPretrainer(cfg, len(vocab), vs)
    tower = build_model(cfg, stage=None)
    load_nano_backbones(tower, folder)
    model.vision.load_state_dict(tower.vision.state_dict())
    model.qformer.load_state_dict(tower.qformer.state_dict())
    blip2 = load_file(str(folder / BLIP2_FILE))
    extra = {"vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias"}
    model.contrastive.load_state_dict({**{k: blip2[k] for k in extra}, "temp": blip2["temp"],
                                       **{f"text_encoder.{k[len('text_encoder.'):]}": v for k, v in heads.items()
                                          if k.startswith("text_encoder.")}})
    model.decoder.load_state_dict({k[len("caption_decoder."):]: v for k, v in heads.items()
                                   if k.startswith("caption_decoder.")})
    model.slots.load_state_dict({k[len("slot_head."):]: v for k, v in heads.items() if k.startswith("slot_head.")})
    return model.float().eval(), vocab


@torch.no_grad()
def measure(folder: str | Path, cfg: TinyGPTVConfig | None = None, settings: PretrainSettings | None = None,
            n_images: int | None = None, n_documents: int | None = None, n_sheet: int | None = None) -> dict:
    """Quality of the backbones as written (fp16 storage included), on held-out scenes and documents."""
    settings = settings or PretrainSettings()
    folder = Path(folder)
    cfg = cfg or get_config(json.loads((folder / CONFIG_FILE).read_text())["model"]["preset"])
    tokenizer = load_tokenizer()
    model, vocab = load_heads(folder, cfg)
    scenes = heldout_scenes(n_images or settings.eval_images)
    pixels = torch.stack([scene_pixels(s, cfg.vision.img_size) for s in scenes])
    retrieval = E.retrieval(model.queries, model.contrastive, tokenizer, vocab, scenes, pixels)
    probes = E.sheet_probe(model.queries, model.decoder, tokenizer, vocab, scenes, pixels)
    probes.update(E.slot_probe(model.queries, model.slots, scenes, pixels))

    tower = build_model(cfg, stage=None)
    load_nano_backbones(tower, folder)
    docs = heldout_documents(tokenizer, n_documents or settings.eval_documents, settings.language)
    ppl = E.perplexity(tower.phi.eval(), docs)
    reading = E.sheet_reading(tower.phi, tokenizer, n_sheet or settings.eval_sheets)
    seeing = {}
    if (folder / SEEING_FILE).is_file():  # Phi answering from the queries, through the phase's own projection
        from ..eval.shapes import evaluate_shapes

        tower.projection.load_state_dict(load_file(str(folder / SEEING_FILE)))
        tower.vision.set_image_size(2 * cfg.vision.img_size)  # as the course's stage 4 shows pictures
        scores = evaluate_shapes(tower.float().eval(), n_scenes=n_images or settings.eval_images, seed=0)
        seeing = {"image_reading": {k: round(v, 4) for k, v in scores.items()}}
    torch.manual_seed(0)
    random_ppl = E.perplexity(build_model(cfg, stage=None).phi.eval(), docs)
    return {"retrieval": retrieval, "perplexity": {"heldout": round(ppl, 3), "random_phi": round(random_ppl, 1),
                                                   "documents": len(docs), "tokens": sum(sum(t[1:]) for _, t in docs)},
            "probes": probes, "sheet_reading": reading, **seeing}
