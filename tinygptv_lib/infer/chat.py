"""Chat with a trained model about one image: `tinygptv chat`, and the session the widget uses.

    tinygptv chat --image data_samples/photos/coffee.jpg --prompt "What is in the cup?"
    tinygptv chat --image scene.png --checkpoint runs/course --task refer --prompt "the red circle" \\
                  --save-boxes boxes.png
    tinygptv chat --image photo.jpg          # interactive: one question a line, empty line or EOF quits
    tinygptv chat --image photo.jpg --release TinyGPT-V_for_Stage4.pth --phi2 phi-2/ \\
                  --eva eva_vit_g.pth --blip2 blip2_pretrained_flant5xxl.pth     # the authors' model (GPU)

The answer streams to stdout (and nothing else goes there); notes go to stderr. Each question is
asked afresh about the same image: the nano model was trained on single turns. The image is
encoded once per image, not once per question.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from .boxes import draw_answer
from .generate import DEMO_SAMPLING, TASKS, TEMPLATES, build_prompt, generate

DEFAULT_COURSE = Path("runs/course")


# --------------------------------------------------------------------------- model


def resolve_checkpoint(path) -> Path:
    """A checkpoint file from a path that may also be a stage folder (its final.pt) or a course
    folder (the latest stage's final.pt, stage 4 when the course finished)."""
    from ..train.checkpoint import CheckpointError

    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        candidates = [p / "final.pt"] + [p / f"stage{s}" / "final.pt" for s in (4, 3, 2, 1)]
        for c in candidates:
            if c.is_file():
                return c
        raise CheckpointError(f"{p}: a folder without final.pt or stage1..4/final.pt (is the run finished?)")
    raise CheckpointError(f"{p}: no such checkpoint file or folder")


def load_chat_model(checkpoint=None, *, preset: str = "nano", device: Optional[str] = None,
                    release=None, phi2=None, eva=None, blip2=None):
    """(model in eval mode, stage) from one of our checkpoints, or from the authors' release files.

    Ours: built as `tinygptv eval` builds it (nano backbones + the checkpoint's trained weights, at
    its training image size). Release: all four sources (see `weights.build_from_release`); fp16 on a GPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if release is not None:
        missing = [n for n, v in (("--phi2", phi2), ("--eva", eva), ("--blip2", blip2)) if v is None]
        if missing:
            raise ValueError(f"building from a release checkpoint also needs {', '.join(missing)}")
        from ..weights import build_from_release

        dtype = torch.float16 if torch.device(device).type == "cuda" else None
        model = build_from_release(release, phi2, eva, blip2, device=device, dtype=dtype)
        return model.eval(), model.stage
    from ..eval.benchmarks import build_eval_model
    from ..train.checkpoint import load_checkpoint

    stage = 4
    if checkpoint is not None:
        checkpoint = resolve_checkpoint(checkpoint)
        stage = int(load_checkpoint(checkpoint, preset=preset)["stage"])
    return build_eval_model(checkpoint, preset=preset, device=device), stage


def default_template(stage: Optional[int]) -> str:
    """The template the checkpoint's stage was trained with (stages 1-2 have none: stage 4's is used)."""
    return "stage3" if stage == 3 else "stage4"


def image_pixels(model, image) -> torch.Tensor:
    """PIL image -> (1, 3, S, S) at the model's image size, device and vision dtype."""
    from ..data.images import preprocess

    p = next(model.vision.parameters())
    return preprocess(image, model.cfg.vision.img_size)[None].to(p.device, dtype=p.dtype)


class ChatSession:
    """One model, one image at a time, many questions (used by the command and the widget)."""

    def __init__(self, model, tokenizer=None, template: str = "stage4", **generation):
        if tokenizer is None:
            from ..tokenizer import load_tokenizer

            tokenizer = load_tokenizer()
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {tuple(TEMPLATES)}, got {template!r}")
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.generation = {"max_new_tokens": 128, **generation}
        self.image = None
        self._embeds = None

    def set_image(self, image) -> None:
        """Encode the image once (ViT, Q-Former, projections) for all the questions about it."""
        self.image = image
        with torch.no_grad():
            self._embeds = self.model.encode_images(image_pixels(self.model, image))

    def prompt(self, question: str, task: Optional[str] = None) -> str:
        return build_prompt(question, self.template, task or None, image=self.image is not None)

    def ask(self, question: str, task: Optional[str] = None, callback: Optional[Callable[[str], None]] = None,
            **overrides) -> str:
        """The answer (streamed into `callback` piece by piece when given)."""
        return generate(self.model, self.tokenizer, self.prompt(question, task), image_embeds=self._embeds,
                        callback=callback, **{**self.generation, **overrides}).texts[0]


# --------------------------------------------------------------------------- the command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, help="the image to talk about (any format PIL reads)")
    p.add_argument("--prompt", help="one question; without it, read questions from stdin (empty line or EOF quits)")
    p.add_argument("--task", choices=TASKS, help="stage-4 task identifier put before the question, e.g. refer")
    p.add_argument("--checkpoint", help="final.pt, a stage folder or a course folder (default: runs/course "
                                        "when it exists, else untrained projections)")
    p.add_argument("--template", choices=("auto",) + tuple(TEMPLATES), default="auto",
                   help="prompt template (auto: the checkpoint stage's, stage3 for a stage-3 checkpoint)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--sample", action="store_true", help="sample as the original demo does (top-p 0.9, "
                                                         "repetition penalty 1.05) instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=DEMO_SAMPLING["top_p"])
    p.add_argument("--repetition-penalty", type=float,
                   help="default 1.05 when sampling, 1.0 (none) for greedy decoding")
    p.add_argument("--seed", type=int, help="sampling seed (default: a random one, printed to stderr)")
    p.add_argument("--save-boxes", metavar="OUT.png",
                   help="when the answer holds boxes, save the image with them drawn")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    g = p.add_argument_group("the authors' released model instead of a checkpoint of ours (needs ~16 GB)")
    g.add_argument("--release", metavar="FILE.pth", help="TinyGPT-V_for_StageN.pth")
    g.add_argument("--phi2", metavar="DIR", help="microsoft/phi-2 folder")
    g.add_argument("--eva", metavar="FILE", help="LAVIS eva_vit_g.pth")
    g.add_argument("--blip2", metavar="FILE",
                   help="LAVIS blip2_pretrained_flant5xxl.pth or a Salesforce/blip2-* folder")


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def run(args) -> int:
    from ..data.images import ImageLoadError, load_image
    from ..train.checkpoint import CheckpointError
    from ..weights.common import WeightLoadError

    try:
        image = load_image(args.image)  # first: a bad path fails before a model is built
    except ImageLoadError as e:
        _err(str(e))
        return 2
    if args.save_boxes and not Path(args.save_boxes).resolve().parent.is_dir():
        _err(f"--save-boxes {args.save_boxes}: its folder does not exist")
        return 2
    if args.release is not None and args.checkpoint is not None:
        _err("give either --checkpoint or --release, not both")
        return 2
    checkpoint = args.checkpoint
    if checkpoint is None and args.release is None:
        if DEFAULT_COURSE.is_dir():
            checkpoint = DEFAULT_COURSE
        else:
            print(f"note: no --checkpoint and no {DEFAULT_COURSE}: the projections are untrained "
                  "(run `tinygptv course` first)", file=sys.stderr)
    try:
        if checkpoint is not None:
            checkpoint = resolve_checkpoint(checkpoint)
            print(f"checkpoint: {checkpoint}", file=sys.stderr)
        model, stage = load_chat_model(checkpoint, device=args.device, release=args.release, phi2=args.phi2,
                                       eva=args.eva, blip2=args.blip2)
    except (CheckpointError, WeightLoadError, FileNotFoundError, ValueError) as e:
        _err(str(e))
        return 2
    template = default_template(stage) if args.template == "auto" else args.template
    generation = {"max_new_tokens": args.max_new_tokens}
    if args.sample:
        seed = args.seed if args.seed is not None else random.randrange(2**31)
        if args.seed is None:
            print(f"sampling with seed {seed} (pass --seed {seed} to repeat this answer)", file=sys.stderr)
        generation.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, seed=seed,
                          repetition_penalty=DEMO_SAMPLING["repetition_penalty"]
                          if args.repetition_penalty is None else args.repetition_penalty)
    elif args.repetition_penalty is not None:
        generation["repetition_penalty"] = args.repetition_penalty
    try:
        session = ChatSession(model, template=template, **generation)
        session.prompt("x", args.task)  # a task the template cannot take fails here, once
        session.set_image(image)
    except ValueError as e:
        _err(str(e))
        return 2

    def answer(question: str) -> None:
        text = session.ask(question, args.task, callback=lambda piece: print(piece, end="", flush=True))
        print(flush=True)
        if args.save_boxes:
            fig = draw_answer(image, text, label=question if args.task == "refer" else None)
            if fig is None:
                print("note: no boxes in the answer, nothing drawn", file=sys.stderr)
            else:
                fig.savefig(args.save_boxes)
                print(f"boxes drawn on {args.save_boxes}", file=sys.stderr)

    try:
        if args.prompt is not None:
            answer(args.prompt)
            return 0
        print(f"{template} template{f', task [{args.task}]' if args.task else ''}; ask about {args.image} "
              "(empty line or Ctrl-D quits)", file=sys.stderr)
        while True:
            print("you> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line.strip():
                return 0
            answer(line.strip())
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # a question the prompt builder refuses, an unwritable --save-boxes path
        _err(str(e))
        return 2


def register(subparsers) -> argparse.ArgumentParser:
    """Add `chat` to the `tinygptv` command."""
    p = subparsers.add_parser("chat", help="ask a trained model about an image (streamed answers)",
                              description="Ask a trained TinyGPT-V about one image: one --prompt, or an "
                                          "interactive loop reading questions from stdin.")
    add_arguments(p)
    p.set_defaults(func=run)
    return p
