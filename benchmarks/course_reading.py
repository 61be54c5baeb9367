"""What each finished course stage can read from the picture, at stage 4's size, next to what Phi
itself reads from the towers' queries (through the seeing phase's projection, before any course stage).

    python benchmarks/course_reading.py --course runs/course --scenes 600

The course's own table evaluates each stage at that stage's image size on 200 scenes; this one asks
every stage the same held-out questions at 224 px (the stage-4 size; each stage's weights loaded into
the stage-4 model, its position grid interpolated), on as many scenes as asked, so that stages compare
with each other and with the seeing reference. It also splits the [refer] answers into right /
imprecise (on the right object, IoU <= 0.5) / wrong object / no box (`eval.shapes.refer_outcome`):
a low refer score is either finding the object or writing its box.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from tinygptv_lib.cli import _stage_model  # noqa: E402
from tinygptv_lib.course import interval95  # noqa: E402
from tinygptv_lib.eval.shapes import REFER_OUTCOMES, evaluate_shapes  # noqa: E402
from tinygptv_lib.pretrain.run import SEEING_FILE  # noqa: E402
from tinygptv_lib.weights.nano import NANO_BACKBONES  # noqa: E402

SIZE = 224
KINDS = ("colour", "shape", "count", "refer_iou50")


def seeing_model():
    """The shipped Phi with the seeing phase's projection, no course stage: what Phi reads by itself."""
    from safetensors.torch import load_file

    model = _stage_model("nano", 4)
    sd = load_file(str(NANO_BACKBONES / SEEING_FILE))
    model.projection.load_state_dict({k: v.float() for k, v in sd.items()})
    return model


def read(model, n_scenes: int) -> tuple[dict, Counter]:
    model.vision.set_image_size(SIZE)
    outcomes: Counter = Counter()
    return evaluate_shapes(model.eval(), n_scenes=n_scenes, seed=0, refer_outcomes=outcomes), outcomes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--course", default="runs/course", help="a `tinygptv course` folder (its stageN/final.pt)")
    ap.add_argument("--scenes", type=int, default=600, help="held-out scenes, one question of each kind a scene")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.scenes < 1:
        ap.error(f"--scenes must be at least 1, got {args.scenes}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [("Phi + seeing projection (no course stage)", seeing_model)]
    for stage in (1, 2, 3, 4):
        final = Path(args.course) / f"stage{stage}" / "final.pt"
        if final.is_file():
            rows.append((f"course stage {stage}", lambda final=final: _stage_model("nano", 4, init_from=final)))
    if len(rows) == 1:
        print(f"note: no finished stage under {args.course} (stageN/final.pt); only the seeing reference")
    print(f"{args.scenes} held-out scenes at {SIZE} px (a score's 95 % interval: about "
          f"+-{interval95(args.scenes):.2f}); refer answers: " + " / ".join(REFER_OUTCOMES))
    print("| weights | " + " | ".join(KINDS) + " | refer answers | s |")
    print("|---" * (len(KINDS) + 3) + "|")
    for name, make in rows:
        t = time.time()
        scores, outcomes = read(make(), args.scenes)
        split = " / ".join(str(outcomes[o]) for o in REFER_OUTCOMES)
        print(f"| {name} | " + " | ".join(f"{scores.get(k, float('nan')):.3f}" for k in KINDS)
              + f" | {split} | {time.time() - t:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
