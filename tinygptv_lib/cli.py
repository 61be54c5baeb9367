"""The `tinygptv` command line."""
from __future__ import annotations

import argparse
import sys
import time


def _cmd_params(args) -> int:
    from .model.summary import parameter_table
    from .model.tinygptv import build_model

    device = "meta" if args.preset == "full" else None  # full size: counted without memory
    model = build_model(args.preset, stage=args.stage, device=device)
    print(f"TinyGPT-V preset={args.preset} stage={args.stage}")
    print(parameter_table(model))
    return 0


def _cmd_step(args) -> int:
    """One real forward+backward step on random pixels and a fixed caption: a smoke test and timing."""
    import torch

    from .model.sequence import build_batch
    from .model.tinygptv import build_model
    from .tokenizer import load_tokenizer

    torch.manual_seed(args.seed)
    model = build_model(args.preset, stage=args.stage)
    model.train()
    cfg = model.cfg
    tok = load_tokenizer()
    prompts = ["<Img><ImageHere></Img> Describe this image in detail."] * args.batch
    answers = ["a small red circle to the left of a large blue square"] * args.batch
    batch = build_batch(tok, prompts, answers, num_query_tokens=cfg.qformer.num_query_tokens, end_sym="###")
    pixels = torch.randn(args.batch, 3, cfg.vision.img_size, cfg.vision.img_size)
    opt = torch.optim.AdamW(model.trainable_parameters().values(), lr=1e-4)
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        loss = model(batch, pixels)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        print(f"step {i}: loss {loss.item():.4f}  {times[-1] * 1000:.0f} ms")
    if len(times) > 1:
        rest = sorted(times[1:])
        print(f"median step (after the first) {rest[len(rest) // 2] * 1000:.0f} ms at batch {args.batch}")
    return 0


def _stage_model(preset: str, stage: int, init_from=None, img_size: int | None = None, *, eva=None, blip2=None,
                 phi2=None):
    """A model for a stage: nano loads the shipped pretrained backbones; full loads the real towers
    where given (eva: LAVIS eva_vit_g.pth, blip2: LAVIS BLIP-2 .pth or HF folder, phi2: the
    microsoft/phi-2 folder); the previous stage's trained weights (its final.pt) are copied in."""
    from .model.tinygptv import build_model

    model = build_model(preset, stage=None)
    if preset == "nano":
        from .weights import load_nano_backbones

        load_nano_backbones(model)
    from .weights import load_blip2_qformer, load_eva_vit, load_phi2

    for source, loader in ((eva, load_eva_vit), (blip2, load_blip2_qformer), (phi2, load_phi2)):
        if source is not None:
            loader(model, source)
    if init_from is not None:
        from .train.checkpoint import load_checkpoint, load_trainable

        ck = load_checkpoint(init_from, preset=preset, up_to_stage=stage)
        if ck["stage"] >= 2 or stage >= 2:
            model.add_lora()
        model.set_stage(stage)
        load_trainable(model, ck["trainable"], str(init_from), strict=False)
    return model


def _cmd_train(args) -> int:
    from .train.config import load_stage_config
    from .train.trainer import Trainer, TrainingStopped, seed_everything

    cfg = load_stage_config(args.stage, args.preset, args.config)
    if args.steps is not None:
        cfg.epochs, cfg.iters_per_epoch = 1, args.steps
    if args.dry_run:
        return _dry_run(cfg)
    towers = {"eva": args.eva, "blip2": args.blip2, "phi2": args.phi2}
    if args.preset == "full" and not all(towers.values()):
        missing = ", ".join(f"--{k}" for k, v in towers.items() if not v)
        print(f"note: without {missing} the full model trains from random towers; give the real "
              "weights (see README, Real weights)", file=sys.stderr)
    seed_everything(cfg.seed)  # the same initial weights in every process and every rerun
    model = _stage_model(args.preset, args.stage, args.init_from, **towers)
    out = args.out or f"runs/{args.preset}/stage{args.stage}"
    try:
        result = Trainer(cfg, out, model, data_root=args.data_root).run(resume=args.resume)
    except KeyboardInterrupt as e:  # Ctrl-C: the trainer saved last.pt first; resume with --resume
        print(f"stage {args.stage}: {str(e) or 'interrupted'}; continue with --resume", file=sys.stderr)
        return 130
    except TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 1
    print(f"stage {args.stage}: {result['steps']} steps, loss {result.get('first_loss', float('nan')):.3f} -> "
          f"{result.get('final_loss', float('nan')):.3f}, checkpoints in {out}")
    return 0


def _dry_run(cfg) -> int:
    """Build the model on the meta device and print the plan: no weights, no memory."""
    from .model.summary import parameter_counts
    from .model.tinygptv import build_model

    model = build_model(cfg.preset, stage=cfg.stage, device="meta")
    if cfg.image_size != model.cfg.vision.img_size:
        model.vision.set_image_size(cfg.image_size)
    counts = parameter_counts(model)
    total = sum(c["total"] for c in counts.values())
    trainable = sum(c["trainable"] for c in counts.values())
    print(f"plan: stage {cfg.stage}, preset {cfg.preset}, image {cfg.image_size} px "
          f"({model.cfg.vision.num_tokens} vision tokens), {cfg.total_steps} steps x batch {cfg.batch_size} "
          f"= {cfg.total_steps * cfg.batch_size:,} samples")
    for d in cfg.datasets:
        print(f"  data: {d['name']:<26} {d['kind']:<13} ratio {d.get('ratio', 1):<5} {cfg.data_root}/{d['path']}")
    print(f"  lr: warm-up {cfg.warmup_start_lr:g} -> {cfg.lr_init:g} over {cfg.warmup_steps} steps, "
          f"cosine to {cfg.lr_min:g}; AdamW wd {cfg.weight_decay}")
    frozen_bytes = (total - trainable) * 2  # fp16/bf16 storage of frozen weights on a GPU
    train_bytes = trainable * 4 * 4  # fp32 weight + grad + two AdamW moments
    print(f"  parameters: trainable {trainable:,} of {total:,}")
    print(f"  memory (weights + optimizer, before activations): {(frozen_bytes + train_bytes) / 2**30:.1f} GiB "
          f"(frozen fp16 {frozen_bytes / 2**30:.1f} GiB, trainable fp32 + AdamW {train_bytes / 2**30:.2f} GiB)")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _cmd_course(args) -> int:
    from .course import run_course

    run_course(args.preset, args.out, seed=args.seed, quick=args.quick, eval_scenes=args.eval_scenes)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinygptv", description="TinyGPT-V course tools")
    sub = p.add_subparsers(dest="command", required=True)

    pp = sub.add_parser("params", help="parameter table per component, frozen vs trainable")
    pp.add_argument("--preset", choices=["nano", "full"], default="nano")
    pp.add_argument("--stage", type=int, choices=[1, 2, 3, 4], default=1)
    pp.set_defaults(func=_cmd_params)

    ps = sub.add_parser("step", help="time forward+backward training steps on random data")
    ps.add_argument("--preset", choices=["nano", "full"], default="nano")
    ps.add_argument("--stage", type=int, choices=[1, 2, 3, 4], default=2)
    ps.add_argument("--batch", type=int, default=8)
    ps.add_argument("--steps", type=int, default=5)
    ps.add_argument("--seed", type=int, default=0)
    ps.set_defaults(func=_cmd_step)

    pt = sub.add_parser("train", help="train one stage (1-4)")
    pt.add_argument("--stage", type=int, choices=[1, 2, 3, 4], required=True)
    pt.add_argument("--preset", choices=["nano", "full"], default="nano")
    pt.add_argument("--config", help="a stage YAML of your own (default: tinygptv_lib/configs/PRESET/stageN.yaml)")
    pt.add_argument("--data-root", help="folder the config's dataset paths are relative to")
    pt.add_argument("--init-from", help="previous stage's final.pt")
    pt.add_argument("--eva", help="full: LAVIS eva_vit_g.pth (the frozen EVA ViT-g)")
    pt.add_argument("--blip2", help="full: LAVIS blip2_pretrained_flant5xxl.pth or a HF Salesforce/blip2-* folder")
    pt.add_argument("--phi2", help="full: the microsoft/phi-2 folder")
    pt.add_argument("--out", help="output folder (default runs/PRESET/stageN)")
    pt.add_argument("--steps", type=int, help="override the number of steps")
    pt.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    pt.add_argument("--dry-run", action="store_true", help="print the plan (meta device, no weights)")
    pt.set_defaults(func=_cmd_train)

    pc = sub.add_parser("course", help="the whole nano course: data, stages 1-4, evaluation, a demo answer")
    pc.add_argument("--preset", choices=["nano"], default="nano")
    pc.add_argument("--out", default="runs/course")
    pc.add_argument("--seed", type=int, default=0)
    pc.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test)")
    pc.add_argument("--eval-scenes", type=_positive_int, default=200,
                    help="held-out scenes asked after each stage (one question of each kind a scene; default 200); "
                         "a stage already finished in OUT keeps the scores it was evaluated with")
    pc.set_defaults(func=_cmd_course)

    from .data.check import register as register_data
    from .eval.benchmarks import register as register_eval
    from .infer.chat import register as register_chat
    from .pretrain.cli import register as register_pretrain

    for register in (register_data, register_eval, register_pretrain, register_chat):
        register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
