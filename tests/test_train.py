"""The stage trainer: schedule, AdamW groups, exact resume, atomic checkpoints, non-finite steps,
bad samples, and two gloo processes computing what one process computes."""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tinygptv_lib.config import get_config
from tinygptv_lib.model.tinygptv import build_model
from tinygptv_lib.train import checkpoint as ckpt
from tinygptv_lib.train.config import load_stage_config
from tinygptv_lib.train.trainer import FINAL, LAST, Trainer, TrainingStopped, param_groups

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data_samples"


def tiny_model(dropout: bool = True):
    cfg = get_config("nano")
    cfg.vision.depth, cfg.qformer.num_layers, cfg.phi.num_layers = 1, 2, 1
    if not dropout:
        cfg.lora.dropout, cfg.phi.resid_pdrop = 0.0, 0.0
    torch.manual_seed(0)
    return build_model(cfg, stage=None)


def tiny_cfg(stage=2, **over):
    base = {"iters_per_epoch": 6, "batch_size": 4, "checkpoint_every": 3, "warmup_steps": 2,
            "data_root": str(DATA)}
    base.update(over)
    return load_stage_config(stage, "nano", overrides=base)


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_schedule_and_param_groups():
    cfg = load_stage_config(1, "full")
    assert cfg.lr_at(0) == pytest.approx(1e-6)
    assert cfg.lr_at(cfg.warmup_steps) == pytest.approx(1e-4)
    assert cfg.lr_at(cfg.total_steps) == pytest.approx(8e-5)
    mid = cfg.lr_at((cfg.warmup_steps + cfg.total_steps) // 2)
    assert 8e-5 < mid < 1e-4
    m = build_model("nano", stage=2)
    decay, no_decay = param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    assert all(p.ndim >= 2 and "bias" not in names[id(p)] for p in decay["params"])
    assert any("layernorm" in names[id(p)] for p in no_decay["params"])
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    n_train = sum(1 for p in m.parameters() if p.requires_grad)
    assert len(decay["params"]) + len(no_decay["params"]) == n_train


def test_shipped_configs_load_and_full_matches_the_recipe():
    for preset in ("nano", "full"):
        for stage in (1, 2, 3, 4):
            cfg = load_stage_config(stage, preset)
            assert cfg.stage == stage and cfg.preset == preset
    full = {s: load_stage_config(s, "full") for s in (1, 2, 3, 4)}
    assert [full[s].batch_size for s in (1, 2, 3)] == [64, 64, 6]
    assert full[4].image_size == 448 and full[3].template == "###Human: {} ###Assistant: "
    assert full[4].template == "[INST] {} [/INST]" and full[4].end_sym == "###"
    assert (full[3].lr_init, full[3].lr_min, full[3].warmup_steps) == (3e-5, 1e-5, 200)


def test_bad_config_is_named(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("stage: 1\npreset: nano\nbatchsize: 3\n")
    with pytest.raises(ValueError, match="unknown setting.*batchsize"):
        load_stage_config(path=bad)


def test_loss_falls_and_resume_is_exact(tmp_path):
    cfg = tiny_cfg(iters_per_epoch=8, checkpoint_every=4, lr_init=3e-3)
    a = Trainer(cfg, tmp_path / "a", tiny_model(), show_progress=False)
    ra = a.run()
    assert ra["final_loss"] < ra["first_loss"]
    # interrupted at step 4 (as SIGINT does: a checkpoint, then KeyboardInterrupt), then resumed
    b = Trainer(cfg, tmp_path / "b", tiny_model(), show_progress=False)
    orig = b.train_step

    def stop_at_4(step):
        out = orig(step)
        if step == 3:
            b.stop_requested = True
        return out

    b.train_step = stop_at_4
    with pytest.raises(KeyboardInterrupt, match="checkpoint saved at step 4"):
        b.run()
    assert ckpt.load_checkpoint(tmp_path / "b" / LAST)["step"] == 4
    c = Trainer(cfg, tmp_path / "b", tiny_model(), show_progress=False)
    rc = c.run(resume=True)
    assert rc["resumed_from"] == 4
    wa, wc = trainable(a.model), trainable(c.model)
    assert wa.keys() == wc.keys()
    for n in wa:
        assert torch.equal(wa[n], wc[n]), n  # dropout RNG and data order replayed exactly


def test_sigkill_during_stage_2_then_resume_matches(tmp_path):
    """A real process killed with SIGKILL mid-run; the resumed run ends where an uninterrupted one does."""
    import yaml

    cfg = load_stage_config(2, "nano", overrides={"checkpoint_every": 2, "batch_size": 4, "data_root": str(DATA)})
    d = cfg.to_dict()
    d["betas"] = list(d["betas"])
    cfg_file = tmp_path / "stage2.yaml"
    cfg_file.write_text(yaml.safe_dump(d))
    env = {**os.environ, "TQDM_DISABLE": "1"}

    def cmd(out, *extra):
        return [sys.executable, "-m", "tinygptv_lib.cli", "train", "--stage", "2", "--config", str(cfg_file),
                "--steps", "8", "--out", str(out), *extra]

    subprocess.run(cmd(tmp_path / "whole"), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(cmd(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / LAST
    import time

    deadline = time.time() + 120
    while time.time() < deadline and not (last.exists() and ckpt.load_checkpoint(last)["step"] >= 2):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    step = ckpt.load_checkpoint(last)["step"]  # readable: saves are atomic
    assert 2 <= step <= 8
    subprocess.run(cmd(tmp_path / "killed", "--resume"), check=True, env=env, capture_output=True)
    a = ckpt.load_checkpoint(tmp_path / "whole" / FINAL)["trainable"]
    b = ckpt.load_checkpoint(tmp_path / "killed" / FINAL)["trainable"]
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-6), n


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.atomic_save({"format": ckpt.FORMAT, "value": 1}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        ckpt.atomic_save({"format": ckpt.FORMAT, "value": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["value"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_checkpoint_errors_are_clear(tmp_path):
    m = tiny_model()
    m.set_stage(2)
    opt = torch.optim.AdamW(m.trainable_parameters().values())
    p = ckpt.save_checkpoint(tmp_path / "c.pt", model=m, optimizer=opt, step=3, preset="nano", stage=2, config={})
    with pytest.raises(ckpt.CheckpointError, match="stage 2, but this run is stage 3"):
        ckpt.load_checkpoint(p, stage=3)
    with pytest.raises(ckpt.CheckpointError, match="preset 'nano', but this run is preset 'full'"):
        ckpt.load_checkpoint(p, preset="full")
    trunc = tmp_path / "t.pt"
    trunc.write_bytes(p.read_bytes()[:200])
    with pytest.raises(ckpt.CheckpointError, match="t.pt: cannot be read"):
        ckpt.load_checkpoint(trunc)
    m1 = tiny_model()
    m1.set_stage(1)
    with pytest.raises(ckpt.CheckpointError, match="unexpected key: .*lora"):
        ckpt.load_trainable(m1, ckpt.load_checkpoint(p)["trainable"], str(p))


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    cfg = tiny_cfg(stage=1, max_nonfinite_in_row=3)
    t = Trainer(cfg, tmp_path, tiny_model(), show_progress=False)
    t._prepare_model()
    before = trainable(t.model)
    real_forward = t.model.forward

    def nan_forward(*a, **k):
        out = real_forward(*a, **k)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(t.model, "forward", nan_forward)
    rec = t.train_step(0)
    assert rec["skipped_step"] and t.nonfinite_total == 1
    assert all(torch.equal(before[n], p) for n, p in trainable(t.model).items())  # no update applied
    t.train_step(1)
    with pytest.raises(TrainingStopped, match="3 steps in a row"):
        t.train_step(2)


def test_bad_image_is_named_or_skipped(tmp_path):
    root = tmp_path / "data"
    shutil.copytree(DATA / "cc_sbu_align", root / "cc_sbu_align")
    victim = sorted((root / "cc_sbu_align" / "image").iterdir())[0]
    victim.write_bytes(b"not a jpeg")
    cfg = tiny_cfg(stage=3, data_root=str(root), batch_size=40, iters_per_epoch=1)
    t = Trainer(cfg, tmp_path / "o", tiny_model(), show_progress=False)
    t._prepare_model()
    with pytest.raises(ValueError, match=f"cc_sbu_align.*{victim.name}.*not an image"):
        for step in range(5):
            t.train_step(step)
    cfg.skip_bad_samples = True
    t2 = Trainer(cfg, tmp_path / "o2", tiny_model(), show_progress=False)
    t2._prepare_model()
    for step in range(5):
        t2.train_step(step)
    assert sum(t2.skipped.values()) >= 1 and "cc_sbu_align: ImageLoadError" in t2.skipped


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    Trainer(tiny_cfg(iters_per_epoch=4, grad_accum=1), out, tiny_model(dropout=False), show_progress=False).run()
    import torch.distributed as dist

    dist.destroy_process_group()


def test_two_gloo_processes_match_one(tmp_path):
    one = Trainer(tiny_cfg(iters_per_epoch=4), tmp_path / "one", tiny_model(dropout=False), show_progress=False)
    one.run()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    a = trainable(one.model)
    b = ckpt.load_checkpoint(tmp_path / "two" / FINAL)["trainable"]
    assert a.keys() == b.keys()
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-5, rtol=1e-4), n
    # and accumulation: 2 micro-batches of 2 equal one batch of 4
    acc = Trainer(tiny_cfg(iters_per_epoch=4, grad_accum=2), tmp_path / "acc", tiny_model(dropout=False),
                  show_progress=False)
    acc.run()
    for n, p in trainable(acc.model).items():
        assert torch.allclose(a[n], p, atol=1e-5, rtol=1e-4), n
