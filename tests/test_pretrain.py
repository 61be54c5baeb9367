"""The pretrained nano backbones: they load through the real loaders, they know the shapes world,
and the code that made them is deterministic and learns."""
from __future__ import annotations

import argparse
import dataclasses
import json
import random

import pytest
import torch
from safetensors import safe_open

from tinygptv_lib.config import PhiConfig, QFormerConfig, VisionConfig, get_config
from tinygptv_lib.data import world as W
from tinygptv_lib.data.formats import encode_image, open_image
from tinygptv_lib.data.images import preprocess
from tinygptv_lib.model.tinygptv import build_model
from tinygptv_lib.pretrain import PretrainSettings, load_heads, pretrain
from tinygptv_lib.pretrain import evaluate as E
from tinygptv_lib.pretrain import texts as T
from tinygptv_lib.pretrain.cli import recipe_flags, register, settings_from
from tinygptv_lib.pretrain import heads as H
from tinygptv_lib.pretrain.dense_stage import (COLOURS, DenseHeads, DenseSettings, box_mask, centre_patch, dense_loss,
                                               make_view, train_dense, view_labels)
from tinygptv_lib.pretrain.language_stage import (LanguageSettings, document, heldout_documents, reading_settings,
                                                  train_language)
from tinygptv_lib.pretrain import seeing_stage as S
from tinygptv_lib.pretrain.vision_stage import (VisionSettings, build_vocab, heldout_scenes, scene_pixels,
                                                train_vision)
from tinygptv_lib.tokenizer import load_tokenizer
from tinygptv_lib.weights import NANO_BACKBONES, load_nano_backbones
from tinygptv_lib.weights.phi2 import ADDED_NORM

MB = 1024 * 1024


def test_shipped_files_are_in_the_real_layouts_and_small():
    files = [p for p in NANO_BACKBONES.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 40 * MB
    assert max(p.stat().st_size for p in files) <= 25 * MB
    keys = {}
    for name in ("eva_vit_nano.safetensors", "blip2_qformer_nano.safetensors", "phi-2-nano/model.safetensors"):
        with safe_open(str(NANO_BACKBONES / name), "pt") as f:
            keys[name] = set(f.keys())
    assert {"cls_token", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.0.attn.q_bias"} <= keys["eva_vit_nano.safetensors"]
    assert {"query_tokens", "ln_vision.weight", "Qformer.bert.embeddings.LayerNorm.weight",
            "Qformer.bert.encoder.layer.0.crossattention.self.query.weight"} <= keys["blip2_qformer_nano.safetensors"]
    phi = keys["phi-2-nano/model.safetensors"]
    assert {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.bias"} <= phi
    assert not any("query_key_value" in k for k in phi)
    quality = json.loads((NANO_BACKBONES / "quality.json").read_text())
    assert {"retrieval", "perplexity", "steps", "seconds", "seed", "torch_version"} <= set(quality)


def test_shipped_backbones_load_completely_and_change_the_weights():
    torch.manual_seed(0)
    model = build_model("nano", stage=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reports = load_nano_backbones(model)
    loaded = {k for r in reports for k in r.loaded}
    wanted = {k for k in before if k.startswith(("vision.", "qformer.", "phi."))
              and not ADDED_NORM.fullmatch(k) and k != "phi.lm_head.weight"}  # lm_head is tied to embed_tokens
    assert wanted <= loaded, sorted(wanted - loaded)[:5]
    after = model.state_dict()
    for key in ("vision.encoder.patch_embed.proj.weight", "vision.ln_vision.weight", "qformer.query_tokens",
                "qformer.model.encoder.layer.0.crossattention.attention.key.weight",
                "phi.model.embed_tokens.weight", "phi.model.layers.0.self_attn.query_key_value.weight"):
        assert not torch.equal(before[key], after[key]), key
    assert torch.equal(after["projection.proj1.weight"], before["projection.proj1.weight"])  # trained later
    assert model.phi.lm_head.weight is model.phi.model.embed_tokens.weight


def test_shipped_towers_retrieve_held_out_captions_far_above_chance():
    heads, vocab = load_heads(NANO_BACKBONES)
    scenes = heldout_scenes(50)
    pixels = torch.stack([scene_pixels(s, get_config("nano").vision.img_size) for s in scenes])
    r = E.retrieval(heads.queries, heads.contrastive, load_tokenizer(), vocab, scenes, pixels)
    assert r["chance"] == 1 / 50
    assert r["image_to_text_top1"] >= 10 * r["chance"], r


def test_shipped_phi_answers_from_a_scene_sheet_in_the_image_slot():
    model = build_model("nano", stage=None)
    load_nano_backbones(model)
    r = E.sheet_reading(model.phi.eval(), load_tokenizer(), n_scenes=20)
    chance = {"colour": 1 / len(W.COLOURS), "shape": 1 / len(W.SHAPES), "count": 1 / 5}
    for kind, level in chance.items():
        assert r[kind] >= 2 * level, (kind, r)


def test_shipped_phi_reads_the_shipped_towers_queries_through_its_seeing_projection():
    from safetensors.torch import load_file
    from tinygptv_lib.eval.shapes import CHANCE, evaluate_shapes
    from tinygptv_lib.pretrain.run import SEEING_FILE

    model = build_model("nano", stage=None)
    load_nano_backbones(model)
    untrained = evaluate_shapes(model.eval(), n_scenes=20)  # random projection: Phi reads nothing
    model.projection.load_state_dict(load_file(str(NANO_BACKBONES / SEEING_FILE)))
    model.vision.set_image_size(224)
    r = evaluate_shapes(model, n_scenes=20)
    for kind in ("colour", "shape"):
        assert r[kind] >= 3 * CHANCE[kind] and r[kind] > untrained[kind] + 0.2, (kind, r, untrained)


def test_shipped_phi_has_a_low_held_out_perplexity():
    docs = heldout_documents(load_tokenizer(), 24, LanguageSettings())
    torch.manual_seed(0)
    random_model = build_model("nano", stage=None)
    model = build_model("nano", stage=None)
    load_nano_backbones(model)
    ppl, random_ppl = E.perplexity(model.phi.eval(), docs), E.perplexity(random_model.phi.eval(), docs)
    assert random_ppl > 10_000
    assert ppl < 10 and ppl < random_ppl / 1000, (ppl, random_ppl)


def _tiny_config():
    cfg = get_config("nano")
    cfg.vision = VisionConfig(img_size=28, patch_size=14, width=32, depth=1, num_heads=2, mlp_hidden=64)
    cfg.qformer = QFormerConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    cfg.proj_hidden = 32
    cfg.phi = PhiConfig(hidden_size=40, num_layers=1, num_heads=1, intermediate_size=80, tie_word_embeddings=True)
    return cfg


def _tiny_settings(steps: int = 4) -> PretrainSettings:
    vision = VisionSettings(steps=steps, batch=4, lr=2e-3, warmup=2, embed_dim=16, text_width=32, text_layers=1,
                            text_heads=2, decoder_width=32, decoder_layers=1, decoder_heads=2)
    return PretrainSettings(DenseSettings(steps=steps, batch=4, warmup=2, lr=2e-3), vision,
                            LanguageSettings(steps=steps, batch=4, warmup=2, lr=3e-3),
                            dataclasses.replace(reading_settings(), steps=steps, batch=4, warmup=2),
                            eval_images=8, eval_documents=4, eval_sheets=3)


def test_tiny_pretraining_is_deterministic_and_its_losses_fall():
    cfg, s, tok = _tiny_config(), _tiny_settings(steps=10), load_tokenizer()
    vocab = build_vocab(tok, n_scenes=50)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        vision, vision_history = train_vision(cfg, s.vision, 3, tok, vocab)
        torch.manual_seed(0)
        phi, language_history = train_language(cfg, s.language, 3, tok)
        runs.append((vision.state_dict(), phi.state_dict(), vision_history, language_history))
    (v1, p1, vh, lh), (v2, p2, _, _) = runs
    assert all(torch.equal(v1[k], v2[k]) for k in v1) and all(torch.equal(p1[k], p2[k]) for k in p1)
    assert sum(h["loss"] for h in vh[-3:]) / 3 < vh[0]["loss"]
    assert sum(h["loss"] for h in lh[-3:]) / 3 < lh[0]["loss"]


def test_tiny_pretrain_command_writes_files_that_load_and_reproduce(tmp_path):
    cfg = _tiny_config()
    q1 = pretrain(tmp_path / "a", seed=1, cfg=cfg, settings=_tiny_settings(), progress=False)
    q2 = pretrain(tmp_path / "b", seed=1, cfg=cfg, settings=_tiny_settings(), progress=False)
    for key in ("retrieval", "perplexity", "probes", "training_loss", "sheet_reading"):
        assert q1[key] == q2[key]
    assert set(q1["sheet_reading"]) <= {"colour", "shape", "count", "refer_iou50"} and q1["sheet_reading"]
    for name in ("eva_vit_nano.safetensors", "blip2_qformer_nano.safetensors", "phi-2-nano/model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert q1["retrieval"]["chance"] == 1 / 8 and q1["seed"] == 1
    model = build_model(cfg, stage=2)  # with LoRA: the Phi base weights go under .base_layer
    load_nano_backbones(model, tmp_path / "a")


def test_one_part_runs_keep_the_other_part_and_refuse_a_different_recipe(tmp_path):
    cfg = _tiny_config()
    pretrain(tmp_path, seed=1, cfg=cfg, settings=_tiny_settings(), progress=False)
    files = {n: (tmp_path / n).read_bytes() for n in ("eva_vit_nano.safetensors", "blip2_qformer_nano.safetensors",
                                                     "pretraining_heads.safetensors", "phi-2-nano/model.safetensors")}
    more = _tiny_settings()
    more.language.steps = 6
    q = pretrain(tmp_path, seed=1, cfg=cfg, settings=more, progress=False, part="language", flags="--language-steps 6")
    for name in ("eva_vit_nano.safetensors", "blip2_qformer_nano.safetensors", "pretraining_heads.safetensors"):
        assert (tmp_path / name).read_bytes() == files[name], name
    assert (tmp_path / "phi-2-nano/model.safetensors").read_bytes() != files["phi-2-nano/model.safetensors"]
    assert q["part"] == "language" and q["steps"]["language"] == 6 and "vision_first" in q["training_loss"]
    made_by = json.loads((tmp_path / "config.json").read_text())["made_by"]
    assert made_by.endswith("--seed 1 && python -m tinygptv_lib.pretrain --out " + str(tmp_path)
                            + " --seed 1 --language-steps 6 --part language")  # the options that made it, then the part
    pretrain(tmp_path, seed=1, cfg=cfg, settings=more, progress=False, part="language",
             flags="--language-steps 6")  # again: replaces, not appends
    assert json.loads((tmp_path / "config.json").read_text())["made_by"] == made_by
    other = _tiny_settings()
    other.vision.lr = 1e-2  # the kept ViT + Q-Former were not made with this
    with pytest.raises(ValueError, match="pretraining.vision differs"):
        pretrain(tmp_path, seed=1, cfg=cfg, settings=other, progress=False, part="language")
    with pytest.raises(ValueError, match="seed 1 was used"):
        pretrain(tmp_path, seed=2, cfg=cfg, settings=more, progress=False, part="vision")
    with pytest.raises(ValueError, match="part must be one of"):
        pretrain(tmp_path, seed=1, cfg=cfg, settings=more, progress=False, part="phi")


def test_reading_phase_continues_the_written_phi_once(tmp_path):
    cfg, phi_file = _tiny_config(), "phi-2-nano/model.safetensors"
    one = pretrain(tmp_path / "one", seed=1, cfg=cfg, settings=_tiny_settings(), progress=False)
    assert json.loads((tmp_path / "one/config.json").read_text())["phi_phases"] == ["language", "reading"]
    assert one["steps"]["reading"] == 4 and "reading_last_50" in one["training_loss"]
    with pytest.raises(ValueError, match="reading phase already"):
        pretrain(tmp_path / "one", seed=1, cfg=cfg, settings=_tiny_settings(), progress=False, part="reading")
    first_only = _tiny_settings()
    first_only.reading.steps = 0
    pretrain(tmp_path / "two", seed=1, cfg=cfg, settings=first_only, progress=False)
    assert json.loads((tmp_path / "two/config.json").read_text())["phi_phases"] == ["language"]
    vit = (tmp_path / "two/eva_vit_nano.safetensors").read_bytes()
    before = (tmp_path / "two" / phi_file).read_bytes()
    pretrain(tmp_path / "two", seed=1, cfg=cfg, settings=_tiny_settings(), progress=False, part="reading")
    assert (tmp_path / "two" / phi_file).read_bytes() != before
    # the two-command chain gives the one run's weights: the reading phase starts from the Phi as written
    assert (tmp_path / "two" / phi_file).read_bytes() == (tmp_path / "one" / phi_file).read_bytes()
    assert (tmp_path / "two/eva_vit_nano.safetensors").read_bytes() == vit
    config = json.loads((tmp_path / "two/config.json").read_text())
    assert config["phi_phases"] == ["language", "reading"] and config["made_by"].endswith("--seed 1 --part reading")
    pretrain(tmp_path / "two", seed=1, cfg=cfg, settings=_tiny_settings(), progress=False, part="language")
    made_by = json.loads((tmp_path / "two/config.json").read_text())["made_by"]
    assert "--part reading" not in made_by and made_by.endswith("--seed 1 --part language")  # both phases again


def _tiny_seeing() -> S.SeeingSettings:
    return S.SeeingSettings(steps=3, batch=2, warmup=1, drill_steps=2, focus_steps=2)


def test_seeing_phase_fits_the_written_phi_to_the_towers_queries_once(tmp_path):
    cfg, phi_file = _tiny_config(), "phi-2-nano/model.safetensors"
    runs = []
    for name in ("a", "b"):
        pretrain(tmp_path / name, seed=1, cfg=cfg, settings=_tiny_settings(), progress=False)
        towers = {n: (tmp_path / name / n).read_bytes() for n in ("eva_vit_nano.safetensors",
                                                                "blip2_qformer_nano.safetensors")}
        before = (tmp_path / name / phi_file).read_bytes()
        # the other phases' settings at their defaults: the folder's own recipe is what counts for them
        settings = PretrainSettings(seeing=_tiny_seeing(), eval_images=8, eval_documents=4, eval_sheets=3)
        runs.append(pretrain(tmp_path / name, seed=1, cfg=cfg, settings=settings, progress=False, part="seeing"))
        assert all((tmp_path / name / n).read_bytes() == b for n, b in towers.items())  # frozen
        assert (tmp_path / name / phi_file).read_bytes() != before
    assert (tmp_path / "a" / phi_file).read_bytes() == (tmp_path / "b" / phi_file).read_bytes()  # deterministic
    q = runs[0]
    assert set(q["image_reading"]) == {"colour", "shape", "count", "refer_iou50"}
    assert q["steps"]["seeing"] == 7 and q["steps"]["reading"] == 4  # the kept phase's own count, not the default
    assert len({"seeing_first", "vision_first", "reading_last_50"}
                                               & set(q["training_loss"])) == 3
    config = json.loads((tmp_path / "a/config.json").read_text())
    assert config["phi_phases"] == ["language", "reading", "seeing"]
    assert config["made_by"].endswith("--seed 1 --part seeing") and config["pretraining"]["seeing"]["steps"] == 3
    from tinygptv_lib.pretrain.run import SEEING_FILE
    assert (tmp_path / "a" / SEEING_FILE).is_file()
    with pytest.raises(ValueError, match="seeing phase continues a Phi after its reading phase"):
        pretrain(tmp_path / "a", seed=1, cfg=cfg, settings=_tiny_settings(), progress=False, part="seeing")
    for part in ("vision", "reading"):  # the Phi now reads these towers' queries: keep them together
        with pytest.raises(ValueError, match="fitted to the queries"):
            pretrain(tmp_path / "a", seed=1, cfg=cfg, settings=_tiny_settings(), progress=False, part=part)
    pretrain(tmp_path / "a", seed=1, cfg=cfg, settings=_tiny_settings(), progress=False, part="language")
    config = json.loads((tmp_path / "a/config.json").read_text())
    assert config["phi_phases"] == ["language", "reading"] and "--part seeing" not in config["made_by"]
    assert not (tmp_path / "a" / SEEING_FILE).exists()


def test_seeing_documents_leave_32_slots_for_the_queries_and_can_drop_unanswerable_drills():
    tok = load_tokenizer()
    drills = (0, 0, 0, 0, 1)
    answers = {True: 0, False: 0}
    for seed in range(40):
        scene, ids, target, wide = S.document(tok, seed, drills)
        assert ids.count(S.SLOT) == 32 and not any(t for i, t in zip(ids, target) if i == S.SLOT)
        assert wide  # drills are stage-4 conversations: the picture at twice the size
        for keep in (True, False):
            pieces = T.lm_document(scene, random.Random(seed), 1.0, drills,
                                   drill_weights=None if keep else {"unanswerable": 0})
            answers[keep] += sum("unanswerable" in p for p in pieces if isinstance(p, str))
    assert answers[True] > 0 and answers[False] == 0
    _, _, _, wide = S.document(tok, 0, (1, 0, 0, 0, 0))  # a stage 1-2 caption: the towers' own size
    assert not wide


def test_seeing_focus_drills_ask_colours_and_boxes_more_often():
    def share(changes):
        turns = [q for s in range(60) for q, _ in T._drill_turns(W.make_scene(s, 224), random.Random(s), 8, changes)]
        return sum(q.startswith(("[vqa] What colour", "[refer]")) for q in turns) / len(turns)
    default, focus = share({"unanswerable": 0.001}), share(S.SeeingSettings().focus_drills)
    assert focus > default + 0.1  # colour 6 and refer 6 of 21 weights, against 3 and 3 of 19


def test_reading_documents_hide_the_facts_from_the_loss_and_drill_lookups():
    tok = load_tokenizer()
    seeds = [W.derive_seed("test/reading", i) for i in range(40)]
    first = [document(tok, s, LanguageSettings(context_share=1.0)) for s in seeds]
    second = [document(tok, s, dataclasses.replace(reading_settings(), context_share=1.0)) for s in seeds]
    assert all(all(t[1:]) for _, t in first)  # first phase: every token after BOS is a target
    for (ids, target), s in zip(second, seeds):
        sheet = tok(T.scene_sheet(W.make_scene(s, 224)), add_special_tokens=False)["input_ids"]
        hidden = [i for i, t in zip(ids, target) if not t]
        assert hidden[1:] == sheet[: len(hidden) - 1]  # BOS, then exactly the sheet's tokens are not targets
    turns = [sum(1 for i in ids if i == 50256) for ids, _ in second]  # BOS opens every turn
    assert max(turns) >= 6  # drills: 6 to 10 turns about one sheet
    drills = [t for s in seeds for t in T._drill_turns(W.make_scene(s, 224), random.Random(s), 10)]
    colour = sum(q.startswith("[vqa] What colour") and a != "unanswerable" for q, a in drills)
    unanswerable = sum(a == "unanswerable" for _, a in drills)
    assert len(set(drills)) > 300 and colour > 2 * unanswerable > 0  # a kind first: absent shapes do not dominate


def test_register_adds_a_pretrain_subcommand():
    parser = argparse.ArgumentParser(prog="tinygptv")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pretrain", "--out", "somewhere", "--seed", "3"])
    assert args.command == "pretrain" and args.out == "somewhere" and args.seed == 3 and callable(args.func)
    assert settings_from(args) == PretrainSettings()  # no flags: the shipped recipe
    flags = ["pretrain", "--part", "vision", "--dense-box-weight", "5", "--slot-anchors"]
    tried = settings_from(parser.parse_args(flags))
    assert tried.dense.box_weight == 5.0 and tried.vision.slot_anchors and tried.language == PretrainSettings().language
    assert recipe_flags(args) == ""  # the shipped recipe: made_by names no options
    assert recipe_flags(parser.parse_args(flags)) == "--dense-box-weight 5 --slot-anchors"
    more = parser.parse_args(["pretrain", "--threads", "1", "--reading-steps", "0", "--dense-box-weight", "2.5"])
    assert recipe_flags(more) == "--threads 1 --reading-steps 0 --dense-box-weight 2.5"


def test_loading_into_a_model_of_other_numbers_fails_clearly():
    from tinygptv_lib.weights import WeightLoadError

    with pytest.raises(WeightLoadError):
        load_nano_backbones(build_model(_tiny_config(), stage=None))


# --------------------------------------------------------------------------- the ViT's dense phase


def _scene_with(objects, size=224):
    """A scene whose objects we place by hand: (kind, colour, size name, bbox)."""
    scene = W.make_scene(W.derive_seed("test/dense", 0), size, n_objects=len(objects))
    scene.objects = [dataclasses.replace(o, kind=k, colour=c, size=s, bbox=b)
                     for o, (k, c, s, b) in zip(scene.objects, objects)]
    scene.image = W.render(scene)
    return scene


def test_dense_labels_name_the_centre_patch_and_leave_the_rest_of_an_object_unasked():
    scene = _scene_with([("star", "red", "large", (0, 0, 64, 64)), ("circle", "blue", "small", (150, 150, 180, 180))])
    grid = 8  # 112 px / 14: each patch covers 28 px of the 224 px scene
    view = make_view(scene, 112, None)
    colour, shape = view_labels(view, grid)
    red, blue = COLOURS.index("red") + 1, COLOURS.index("blue") + 1
    star, circle = W.SHAPES.index("star") + 1, W.SHAPES.index("circle") + 1
    assert colour[0] == red and colour[grid + 1] == red and colour[grid * grid - 1] == 0
    assert shape[1 * grid + 1] == star  # centre (32, 32) px -> patch (1, 1)
    assert shape[0] == -100 and shape[grid * grid - 1] == 0  # star, not its centre / background
    assert shape[5 * grid + 5] == circle and colour[5 * grid + 5] == blue  # centre (165, 165) -> (5, 5)


def test_dense_crops_are_native_resolution_and_move_the_labels_with_them():
    scene = _scene_with([("square", "green", "large", (120, 120, 180, 180)), ("star", "red", "small", (0, 0, 30, 30))])
    rng = random.Random(0)
    x0, y0 = rng.randint(0, 112), rng.randint(0, 112)  # what make_view draws from the same rng
    view = make_view(scene, 112, random.Random(0))
    assert view.pixels.shape == (3, 112, 112)
    whole = preprocess(open_image(encode_image(scene.image, "jpg")).crop((x0, y0, x0 + 112, y0 + 112)), 112)
    assert torch.equal(view.pixels, whole)  # a crop, not a resize
    assert torch.allclose(view.centres[0], torch.tensor([(150 - x0) / 112, (150 - y0) / 112]))
    assert (view.boxes >= 0).all() and (view.boxes <= 1).all()
    mask = box_mask(view.boxes[0], 8)
    assert mask.any() and centre_patch(view.centres[0], 8) is not None
    assert bool(mask[centre_patch(view.centres[0], 8)])


def test_dense_box_loss_asks_every_patch_of_an_object_for_that_objects_box():
    # the star (drawn first) lies partly under the square: shared patches belong to the square
    scene = _scene_with([("star", "red", "large", (0, 0, 84, 84)), ("square", "blue", "large", (56, 56, 140, 140))])
    grid = 8  # 28 px of the 224 px scene a patch
    view = make_view(scene, 112, None)
    owner = H.patch_owner(view.boxes, grid)
    assert owner[0] == 0 and owner[2 * grid + 2] == 1 and owner[grid * grid - 1] == -1  # star, square (on top), none
    assert (owner == 0).sum() == 9 - 1 and (owner == 1).sum() == 9  # 3 x 3 patches each, one shared
    heads = DenseHeads(width=6, box=True)
    tokens = torch.randn(1, grid * grid, 6)
    with torch.no_grad():  # a head that answers the square's box everywhere
        heads.box.weight.zero_()
        heads.box.bias.copy_(torch.logit(view.boxes[1]))
    star_error = (view.boxes[0] - view.boxes[1]).abs().mean()
    expected = star_error * 8 / 17  # 8 star patches wrong, 9 square patches right
    assert torch.allclose(dense_loss(heads, tokens, [view], grid)["box"], expected, atol=1e-5)


def test_the_box_loss_and_query_places_are_switched_by_the_settings():
    cfg, s = _tiny_config(), DenseSettings(steps=3, batch=4, warmup=1)
    torch.manual_seed(0)
    plain, plain_history = train_dense(cfg, s, seed=2)
    torch.manual_seed(0)
    boxed, boxed_history = train_dense(cfg, dataclasses.replace(s, box_weight=5.0), seed=2)
    assert "box" not in plain_history[0] and boxed_history[0]["box"] > 0
    assert plain_history[0]["patch"] == boxed_history[0]["patch"]  # same start, then the box loss moves the ViT
    assert not torch.equal(plain.encoder.patch_embed.proj.weight, boxed.encoder.patch_embed.proj.weight)
    tok = load_tokenizer()
    vocab = build_vocab(tok, n_scenes=20)
    placed = dataclasses.replace(_tiny_settings().vision, slot_anchors=True)
    from tinygptv_lib.pretrain.vision_stage import VisionPretrainer
    assert VisionPretrainer(cfg, len(vocab), _tiny_settings().vision).anchors is None
    assert torch.equal(VisionPretrainer(cfg, len(vocab), placed).anchors, H.anchor_points(32))


def test_slot_queries_take_the_object_nearest_their_place_whatever_they_predict():
    anchors = H.anchor_points(32)  # a 6 x 6 grid less its corners, row by row
    cells = [(x, y) for y in range(6) for x in range(6) if not (x in (0, 5) and y in (0, 5))]
    assert anchors.shape == (32, 2) and torch.allclose(anchors, (torch.tensor(cells) + 0.5) / 6)
    assert len({tuple(a) for a in H.anchor_points(5).tolist()}) == 5
    target = {"colour": torch.tensor([2, 1]), "shape": torch.tensor([0, 3]), "size": torch.tensor([1, 0]),
              "box": torch.tensor([[0.30, 0.30, 0.45, 0.45], [0.75, 0.70, 0.95, 0.90]])}  # centres near cells (2, 2), (5, 4)
    for seed in range(2):  # two sets of predictions: the same queries answer for the objects
        torch.manual_seed(seed)
        pred = {"object": torch.randn(1, 32), "colour": torch.randn(1, 32, 4), "shape": torch.randn(1, 32, 6),
                "size": torch.randn(1, 32, 3), "box": torch.rand(1, 32, 4)}
        for v in pred.values():
            v.requires_grad_(True)
        H.slot_loss(pred, [target], anchors=anchors).backward()
        asked = pred["colour"].grad[0].abs().sum(-1).nonzero().flatten().tolist()
        assert asked == [cells.index((2, 2)), cells.index((5, 4))]
        assert (pred["object"].grad[0, asked] < 0).all()  # these two must say "object"
        assert (pred["object"].grad[0].sum() - pred["object"].grad[0, asked].sum()) > 0  # the rest "none"
    free = H.slot_loss(pred, [target])  # matching on the predictions picks other queries
    assert free.item() != H.slot_loss(pred, [target], anchors=anchors).item()


def test_dense_phase_is_deterministic_and_hands_its_vit_to_the_blip2_phase():
    cfg, s = _tiny_config(), DenseSettings(steps=12, batch=6, warmup=2, lr=3e-3)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)  # the towers' initial weights (pretrain() seeds before each phase)
        runs.append(train_dense(cfg, s, seed=5))
    (v1, h1), (v2, h2) = runs
    assert h1 == h2 and all(torch.equal(a, b) for a, b in zip(v1.state_dict().values(), v2.state_dict().values()))
    assert sum(h["loss"] for h in h1[-3:]) / 3 < h1[0]["loss"]
    tok = load_tokenizer()
    model, _ = train_vision(cfg, _tiny_settings(steps=0).vision, 5, tok, build_vocab(tok, n_scenes=20), vision=v1)
    assert all(torch.equal(a, b) for a, b in zip(model.vision.state_dict().values(), v1.state_dict().values()))


def test_sampled_softmax_estimates_the_full_loss_at_a_twentieth_of_the_rows():
    from tinygptv_lib.model.phi import build_phi
    from tinygptv_lib.pretrain.language_stage import corpus_vocab, lm_loss, pad_documents, training_documents

    tok, s = load_tokenizer(), LanguageSettings(batch=4)
    vocab = corpus_vocab(tok, s, n_docs=50)
    assert 100 < len(vocab) < 2000 and torch.equal(vocab, vocab.sort().values)
    torch.manual_seed(0)
    phi = build_phi(_tiny_config().phi).eval()
    ids, mask, target = pad_documents(training_documents(tok, 0, 0, s))
    full = lm_loss(phi, ids, mask, target).item()
    sampled = [lm_loss(phi, ids, mask, target, vocab).item() for _ in range(3)]
    assert all(abs(x - full) < 0.02 * full for x in sampled), (full, sampled)
    assert len(set(sampled)) > 1  # a new draw of negatives each call
