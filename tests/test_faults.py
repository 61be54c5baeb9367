"""Bad input and faults (issue 8): the cases the other test files do not already cover.

Every test makes its own bad input. docs/FAULTS.md lists each case with the test that shows it,
here or in test_images / test_formats / test_data_check / test_train / test_weights / test_model.
"""
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest
from conftest import EvilPickle
import torch
from PIL import Image

from tinygptv_lib.data import check as C
from tinygptv_lib.data import formats as F
from tinygptv_lib.data import images as I
from tinygptv_lib.data.formats._common import iter_jsonl
from tinygptv_lib.data.stages import Sample, SkipLog, load_datasets
from tinygptv_lib.model.sequence import (IMAGE_SLOT, PromptWarning, UnknownTaskWarning, build_batch,
                                          build_conversation_batch, build_prompt_batch, tokenize_prompt)
from tinygptv_lib.tokenizer import load_tokenizer
from tinygptv_lib.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data_samples"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def tiny_image(path: Path, colour=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


# =========================================================================== 1. images


def test_one_loader_serves_training_evaluation_and_the_readers():
    """Training, evaluation, the demo and the data readers all decode through data.images.load_image."""
    from tinygptv_lib.eval import benchmarks
    from tinygptv_lib.train import trainer

    assert trainer.load_image is I.load_image and benchmarks.load_image is I.load_image
    # the readers' open_image (shards, data check) is the same loader: alpha on white, bad bytes refused
    buf = io.BytesIO()
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(buf, "PNG")
    assert F.open_image(buf.getvalue()).getpixel((1, 1)) == (255, 255, 255)
    with pytest.raises(I.ImageLoadError, match="not an image file PIL can read"):
        F.open_image(b"this is text, not a picture")
    sample = F.ShardSample("k", b"", "a caption")
    with pytest.raises(I.ImageLoadError, match="empty image data"):
        sample.decode()


def test_no_module_decodes_images_but_the_loader():
    """Image.open appears only in data/images.py, and in data check's structure-only verify() pass."""
    package = ROOT / "tinygptv_lib"
    users = sorted(str(p.relative_to(package)) for p in package.rglob("*.py") if "Image.open(" in p.read_text())
    assert users == ["data/check.py", "data/images.py"]
    check_lines = [line for line in (package / "data/check.py").read_text().splitlines() if "Image.open(" in line]
    assert len(check_lines) == 2 and all(line.strip().startswith("with Image.open(") for line in check_lines)


def test_data_check_uses_the_same_loader_and_flags_a_decompression_bomb(tmp_path, monkeypatch):
    big = tiny_image(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 8 x 8 = 64 pixels: over twice the limit
    result = C._verify_file(big, decode=True)
    assert result.exists and "decompression" in result.error.lower()


# =========================================================================== 2. annotations


def _llava(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


GOOD_CHAT = {"id": "ok", "image": "a.png", "conversations": [
    {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}


@pytest.mark.parametrize("edit, field, problem", [
    (lambda r: r["conversations"][1].update(value="   "), "conversations[1].value", "empty answer"),
    (lambda r: r["conversations"].pop(), "conversations[0]", "no answer"),
    (lambda r: r.update(image=["a.png"]), "image", "expected a string"),
    (lambda r: r.pop("conversations"), "conversations", "missing"),
    (lambda r: r.update(image="../../etc/passwd"), "image", "escapes the data root"),
    (lambda r: r.update(image="/etc/passwd"), "image", "absolute path"),
])
def test_llava_record_errors_name_file_record_and_field(tmp_path, edit, field, problem):
    tiny_image(tmp_path / "a.png")
    bad = json.loads(json.dumps(GOOD_CHAT))
    bad["id"] = "bad"
    edit(bad)
    path = _llava(tmp_path / "chat.json", [GOOD_CHAT, bad])
    with pytest.raises(F.DataFormatError) as info:
        F.read_llava(path)
    err = info.value
    assert err.file.endswith("chat.json") and err.record == "record 1 (id 'bad')" and err.field == field
    assert problem in str(err)


def test_empty_answers_and_captions_are_refused_in_every_training_format(tmp_path):
    F.write_vqav2(tmp_path / "q.json", tmp_path / "a.json", [F.VQARecord(1, 1, "Q?", ["x"] * 10, "  ")])
    with pytest.raises(F.DataFormatError, match=r"a\.json: record 0 \(question_id 1\): field "
                                                r"'multiple_choice_answer': empty answer"):
        F.read_vqav2(tmp_path / "q.json", tmp_path / "a.json", tmp_path, check_images=False)
    F.write_gqa(tmp_path / "g.json", [F.GQARecord("7", "img", "Q?", "", "Full.")])
    with pytest.raises(F.DataFormatError, match=r"record 0 \(qid '7'\): field 'answer': empty answer"):
        F.read_gqa(tmp_path / "g.json", tmp_path, check_images=False)
    F.write_cc_sbu_align(tmp_path / "align", [F.AlignRecord("3", "")])
    with pytest.raises(F.DataFormatError, match=r"field 'caption': empty caption"):
        F.read_cc_sbu_align(tmp_path / "align", check_images=False)
    F.write_refcoco(tmp_path / "refs.json", [F.RefRecord(4, "a.jpg", ["the dot", " "], [1, 1, 2, 2], 8, 8)])
    with pytest.raises(F.DataFormatError, match=r"record 0 \(ref_id 4\): field 'sentences\[1\]': empty sentence"):
        F.read_refcoco(tmp_path / "refs.json", tmp_path, check_images=False)
    png = F.encode_image(Image.new("RGB", (4, 4)), "png")
    F.write_shard(tmp_path / "s.tar", [F.ShardSample("k0", png, " ")])
    with pytest.raises(F.DataFormatError, match=r"s\.tar: sample 0 \(key 'k0'\): field 'txt': empty caption"):
        list(F.read_shard(tmp_path / "s.tar"))


@pytest.mark.parametrize("bbox, width, field, problem", [
    ("[NaN, 0, 2, 2]", 8, "bbox[0]", "finite number"),
    ("[0, 0, Infinity, 2]", 8, "bbox[2]", "finite number"),
    ("[0, 0, 2, 2]", 0, "width", "image size must be positive"),
    ("[-5, 0, 2, 2]", 8, "bbox", "outside"),
    ("[0, 0, 0, 2]", 8, "bbox", "must be positive"),
])
def test_degenerate_boxes_are_refused(tmp_path, bbox, width, field, problem):
    path = tmp_path / "refs.json"
    path.write_text(f'[{{"ref_id": 1, "image": "a.jpg", "sentences": ["x"], "bbox": {bbox}, '
                    f'"width": {width}, "height": 8}}]')
    with pytest.raises(F.DataFormatError) as info:
        F.read_refcoco(path, tmp_path, check_images=False)
    assert info.value.field == field and problem in str(info.value) and "record 0 (ref_id 1)" in str(info.value)


def test_annotation_files_that_are_not_utf8_are_named(tmp_path):
    path = tmp_path / "chat.json"
    path.write_bytes(json.dumps([GOOD_CHAT]).encode().replace(b"red", b"r\xe9d"))  # latin-1, not UTF-8
    with pytest.raises(F.DataFormatError, match=r"chat\.json: not UTF-8 text: byte b'\\xe9' at offset"):
        F.read_llava(path, check_images=False)
    lines = tmp_path / "test.jsonl"
    good = json.dumps({"image": "a.jpg", "caption": "c", "label": 1, "relation": "near"})
    lines.write_bytes((good + "\n").encode() + b'{"image": "b\xff.jpg"}\n')
    with pytest.raises(F.DataFormatError, match=r"test\.jsonl: line 2: not UTF-8 text"):
        F.read_vsr(lines, tmp_path, check_images=False)


def test_data_check_reports_a_non_utf8_line_among_good_ones(tmp_path):
    root = tmp_path / "data"
    shutil.copytree(SAMPLES / "eval", root / "eval")
    shutil.copy(SAMPLES / "manifest.json", root / "manifest.json")
    vsr = root / "eval/vsr/test.jsonl"
    lines = vsr.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"caption":"', b'"caption":"\xff')
    vsr.write_bytes(b"".join(lines))
    report = C.check_stage("eval", root)
    (bad,) = report.problems
    assert bad.dataset == "vsr" and bad.record == "line 2" and "not UTF-8" in bad.reason
    assert {d.name: d.records for d in report.datasets}["vsr"] == len(lines) - 1  # the rest still read


def _vqa_root(tmp_path: Path) -> Path:
    d = tmp_path / "vqa"
    records = [F.VQARecord(q, q, f"question {q}?", [f"a{q}"] * 10, f"a{q}") for q in (1, 2, 3, 4)]
    F.write_vqav2(d / "questions.json", d / "annotations.json", records)
    for q in (1, 2, 3, 4):
        tiny_image(d / "images" / f"{q:012d}.jpg")
    return d


def test_skip_flag_leaves_bad_records_out_and_counts_why(tmp_path):
    d = _vqa_root(tmp_path)
    ann = json.loads((d / "annotations.json").read_text())
    ann["annotations"][1]["question_id"] = "2"  # wrong type
    ann["annotations"][2]["multiple_choice_answer"] = ""  # empty answer
    (d / "annotations.json").write_text(json.dumps(ann))
    (d / "images" / f"{4:012d}.jpg").unlink()  # a missing image
    spec = [{"name": "coco_vqa", "kind": "vqa", "path": "vqa"}]
    # without the flag: the first bad record stops the load, naming file, record and field
    with pytest.raises(F.DataFormatError, match=r"annotations\.json: record 1: field 'question_id': expected an "
                                                r"integer"):
        load_datasets(tmp_path, spec, "[INST] {} [/INST]", seed=0)
    # with it: the good record is kept, each bad one counted by reason (a question whose annotation
    # was bad is not counted a second time for having no annotation)
    log = SkipLog()
    data = load_datasets(tmp_path, spec, "[INST] {} [/INST]", seed=0, skip_log=log)
    assert [s.turns[0][1] for s in data["coco_vqa"]] == ["a1"]
    assert log.counts == Counter({"coco_vqa: field 'question_id': expected an integer": 1,
                                  "coco_vqa: field 'multiple_choice_answer': empty answer": 1,
                                  "coco_vqa: field 'image_id': image file not found": 1})
    summary = log.summary()
    assert "skipped 3 bad record(s)" in summary and "record 2 (question_id 3)" in summary
    # nothing usable left: a clear error, with the count of what was skipped
    ann["annotations"][0]["multiple_choice_answer"] = " "
    (d / "annotations.json").write_text(json.dumps(ann))
    with pytest.raises(F.DataFormatError, match=r"has no usable records \(4 bad record\(s\) skipped\)"):
        load_datasets(tmp_path, spec, None, seed=0, skip_log=SkipLog())


def test_skip_flag_in_every_reader(tmp_path):
    errors = []
    tiny_image(tmp_path / "a.png")
    bad = dict(GOOD_CHAT, id="bad", image="../x.png")
    path = _llava(tmp_path / "chat.json", [GOOD_CHAT, bad, "not a record"])
    assert [r.id for r in F.read_llava(path, on_error=errors.append)] == ["ok"]
    assert [e.record for e in errors] == ["record 1 (id 'bad')", "record 2"]
    errors.clear()
    F.write_refcoco(tmp_path / "refs.json", [F.RefRecord(1, "a.png", ["x"], [0, 0, 4, 4], 8, 8),
                                             F.RefRecord(2, "a.png", ["x"], [0, 0, 40, 4], 8, 8)])
    assert [r.ref_id for r in F.read_refcoco(tmp_path / "refs.json", tmp_path, on_error=errors.append)] == [1]
    assert errors[0].field == "bbox"
    errors.clear()
    png = F.encode_image(Image.new("RGB", (4, 4)), "png")
    with tarfile.open(tmp_path / "mixed.tar", "w") as tar:
        for name, data in (("k1.png", png), ("k1.txt", b"fine"), ("k2.png", png), ("k3.png", png),
                           ("k3.txt", b"\xff\xfe"), ("k4.png", png), ("k4.txt", b"also fine")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all")
    keys = [s.key for s in F.read_shards([tmp_path / "mixed.tar", tmp_path / "junk.tar"], on_error=errors.append)]
    assert keys == ["k1", "k4"]
    assert [(e.field, e.problem) for e in errors][:2] == [("txt", "no caption member"), ("txt", "caption is not UTF-8")]
    assert "not a readable tar file" in errors[2].problem
    errors.clear()
    lines = tmp_path / "dev.jsonl"
    lines.write_text('{"id": 1, "img": "a.png", "label": 0, "text": "t"}\n{"id": 2, "img"\n')
    assert list(iter_jsonl(lines, on_error=errors.append)) == [(0, {"id": 1, "img": "a.png", "label": 0, "text": "t"})]
    assert errors[0].record == "line 2" and "invalid JSON" in errors[0].problem


def test_trainer_with_skip_flag_logs_what_it_left_out(tmp_path, capsys):
    from test_train import tiny_cfg, tiny_model
    from tinygptv_lib.train.trainer import Trainer

    root = tmp_path / "data"
    shutil.copytree(SAMPLES / "cc_sbu_align", root / "cc_sbu_align")
    cap = json.loads((root / "cc_sbu_align/filter_cap.json").read_text())
    cap["annotations"][0]["caption"] = ""
    cap["annotations"][1]["image_id"] = "../../../etc/passwd"
    (root / "cc_sbu_align/filter_cap.json").write_text(json.dumps(cap))
    cfg = tiny_cfg(stage=3, data_root=str(root), batch_size=2, iters_per_epoch=1)
    with pytest.raises(F.DataFormatError, match=r"filter_cap\.json: record 0 .*field 'caption': empty caption"):
        Trainer(cfg, tmp_path / "o", tiny_model(), show_progress=False)
    cfg.skip_bad_samples = True
    t = Trainer(cfg, tmp_path / "o", tiny_model(), show_progress=False)
    out = capsys.readouterr().out
    assert "skipped 2 bad record(s)" in out and "field 'caption': empty caption" in out
    assert "field 'image_id': path … escapes the data root …" in out
    assert len(t.datasets["cc_sbu_align"]) == len(cap["annotations"]) - 2
    result = t.run()
    assert sum(result["skipped_records"].values()) == 2


def test_trainer_names_the_record_whose_prompt_and_image_disagree(tmp_path):
    from test_train import tiny_cfg, tiny_model
    from tinygptv_lib.train.trainer import Trainer

    cfg = tiny_cfg(stage=3, batch_size=2, iters_per_epoch=1)
    t = Trainer(cfg, tmp_path, tiny_model(), show_progress=False)
    image = str(next((SAMPLES / "cc_sbu_align/image").iterdir()))
    no_marker = Sample(image, "mine:7", (("###Human: Describe it. ###Assistant: ", "a circle"),), "mine")
    no_image = Sample(None, "mine:8", (("###Human: <Img><ImageHere></Img> Describe. ###Assistant: ", "x"),), "mine")
    with pytest.raises(ValueError, match=r"dataset 'mine', record mine:7: .*an image was given but the prompt has "
                                         r"no '<ImageHere>'"):
        t._encode([no_marker])
    with pytest.raises(ValueError, match=r"record mine:8: .*has '<ImageHere>' but no image was given"):
        t._encode([no_image])
    t.cfg.skip_bad_samples = True
    assert t._encode([no_marker, no_image]) == (None, None)
    assert t.skipped["mine: ValueError"] == 2


# =========================================================================== 3. prompts


def test_empty_prompt_is_refused(tok):
    for prompt in ("", "   \n\t"):
        with pytest.raises(ValueError, match="empty prompt"):
            tokenize_prompt(tok, prompt, 32)
        with pytest.raises(ValueError, match="empty prompt"):
            build_prompt_batch(tok, [prompt], num_query_tokens=32)
    assert tokenize_prompt(tok, "<ImageHere>", 4) == [IMAGE_SLOT] * 4  # image only: stages 1-2's prompt
    with pytest.raises(ValueError, match="no prompts given"):
        build_prompt_batch(tok, [], num_query_tokens=32)
    with pytest.raises(ValueError, match="no conversations given"):
        build_batch(tok, [], [], num_query_tokens=32)


def test_unknown_task_identifier_warns_with_the_known_ones(tok):
    with pytest.warns(UnknownTaskWarning, match=r"\[foo\].*known identifiers: \[vqa\], \[caption\], \[refer\], "
                                                r"\[identify\], \[grounding\], \[detection\]"):
        tokenize_prompt(tok, "[INST] <Img><ImageHere></Img> [foo] what is this? [/INST]", 32)
    with pytest.warns(UnknownTaskWarning, match=r"\[VQA\]"):  # identifiers are lower case
        tokenize_prompt(tok, "[INST] [VQA] a text-only question [/INST]", 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known identifiers, and brackets elsewhere, warn about nothing
        for task in ("vqa", "caption", "refer", "identify", "grounding", "detection"):
            tokenize_prompt(tok, f"[INST] <Img><ImageHere></Img> [{task}] x [/INST]", 32)
        tokenize_prompt(tok, "[INST] <Img><ImageHere></Img> [vqa] what does [1] say? [/INST]", 32)
        tokenize_prompt(tok, "###Human: <Img><ImageHere></Img> Describe this image. ###Assistant: ", 32)


def test_stray_image_markers(tok):
    with pytest.raises(ValueError, match="2 '<ImageHere>' markers"):
        tokenize_prompt(tok, "<Img><ImageHere></Img> compare with <Img><ImageHere></Img>", 32)
    with pytest.raises(ValueError, match="may only appear in the first question, found in turn 1"):
        build_conversation_batch(tok, [[("<ImageHere> hi", "hello"), ("and <ImageHere>?", "no")]],
                                 num_query_tokens=32)
    for near in ("<imagehere>", "<image>", "< Image Here >"):
        with pytest.warns(PromptWarning, match="not the image marker '<ImageHere>'"):
            ids = tokenize_prompt(tok, f"<Img>{near}</Img> what is it?", 32)
        assert IMAGE_SLOT not in ids  # read as text, not as an image


def test_placeholder_and_image_must_agree_when_the_caller_says(tok):
    prompts = ["<Img><ImageHere></Img> what?", "just text"]
    assert build_prompt_batch(tok, prompts, num_query_tokens=4, has_image=[True, False]).has_image.tolist() == [
        True, False]
    with pytest.raises(ValueError, match="sample 1: an image was given but the prompt has no '<ImageHere>'"):
        build_prompt_batch(tok, prompts, num_query_tokens=4, has_image=[True, True])
    with pytest.raises(ValueError, match="sample 0: the prompt has '<ImageHere>' but no image was given"):
        build_batch(tok, prompts, ["a", "b"], num_query_tokens=4, has_image=[False, False])
    with pytest.raises(ValueError, match="has_image lists 1 samples for a batch of 2"):
        build_prompt_batch(tok, prompts, num_query_tokens=4, has_image=[True])


def test_text_that_is_not_utf8_is_refused(tok):
    with pytest.raises(ValueError, match=r"prompt is not valid UTF-8: byte b'\\xff' at position 4"):
        tokenize_prompt(tok, b"abc \xff", 32)
    assert tokenize_prompt(tok, "caf\u00e9".encode(), 32) == tokenize_prompt(tok, "caf\u00e9", 32)  # UTF-8 bytes
    surrogate = b"caf\xe9".decode("utf-8", errors="surrogateescape")  # what os.fsdecode / argv leave
    with pytest.raises(ValueError, match=r"prompt holds '\\udce9' at position 3, which is not valid Unicode"):
        tokenize_prompt(tok, surrogate, 32)
    with pytest.raises(ValueError, match=r"conversation 0, turn 0: answer holds '\\udce9'"):
        build_batch(tok, ["<ImageHere> q"], [surrogate], num_query_tokens=4)
    with pytest.raises(TypeError, match="prompt must be a str, got int"):
        tokenize_prompt(tok, 42, 32)
    with pytest.raises(ValueError, match=r"conversation 0, turn 0: expected a \(question, answer\) pair"):
        build_conversation_batch(tok, [[("only a question",)]], num_query_tokens=4)


def test_over_long_prompt_is_cut_with_a_warning_and_the_image_kept(tok):
    prompt = "[INST] <Img><ImageHere></Img> " + "tell me more " * 200 + "[/INST]"
    with pytest.warns(PromptWarning, match="truncated to 60 .*image is kept whole"):
        batch = build_prompt_batch(tok, [prompt, "<ImageHere> hi"], num_query_tokens=32, max_prompt_len=60)
    row = batch.input_ids[0].tolist()
    assert len(row) == 61 and row.count(IMAGE_SLOT) == 32  # BOS + 60, all 32 slots
    assert tok.decode(row[-4:]).endswith("[/INST]")  # the end, where the answer begins, is kept
    with pytest.raises(ValueError, match="cannot hold the 32 image slots"):
        tokenize_prompt(tok, prompt, 32, max_prompt_len=31)
    with pytest.raises(ValueError, match="max_prompt_len must be at least 1"):
        tokenize_prompt(tok, "hi", 32, max_prompt_len=0)


# =========================================================================== 4. checkpoints


def _save(tmp_path, name="c.pt", preset="nano", stage=2, **extra):
    obj = {"format": ckpt.FORMAT, "version": ckpt.VERSION, "preset": preset, "stage": stage, "step": 3,
           "trainable": {"w": torch.zeros(2)}, **extra}
    return ckpt.atomic_save(obj, tmp_path / name)


def test_checkpoint_of_another_stage_or_preset_is_refused_for_init(tmp_path):
    p3 = _save(tmp_path, "s3.pt", stage=3)
    with pytest.raises(ckpt.CheckpointError, match=r"s3\.pt: checkpoint of stage 3, but this model is for stage 2; "
                                                   r"a stage starts from an earlier stage's final\.pt \(expected "
                                                   r"stage 1\)"):
        ckpt.load_checkpoint(p3, up_to_stage=2)
    assert ckpt.load_checkpoint(p3, up_to_stage=4)["stage"] == 3  # evaluation's stage-4 model takes any stage
    from tinygptv_lib.cli import _stage_model

    with pytest.raises(ckpt.CheckpointError, match="checkpoint of stage 3, but this model is for stage 2"):
        _stage_model("nano", 2, init_from=p3)
    full = _save(tmp_path, "full.pt", preset="full", stage=1)
    with pytest.raises(ckpt.CheckpointError, match=r"full\.pt: checkpoint of preset 'full', but this run is preset "
                                                   r"'nano'"):
        _stage_model("nano", 2, init_from=full)




@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoint_files_that_are_not_checkpoints(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT, "trainable": EvilPickle(marker)}, evil)
    with pytest.raises(ckpt.CheckpointError, match=r"evil\.pt: .*refused: loading it would run code from the file "
                                                   r"\(it asks for posix\.system\); only weights_only"):
        ckpt.load_checkpoint(evil)
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"trainable": EvilPickle(marker)}))
    with pytest.raises(ckpt.CheckpointError, match=r"legacy\.pt: .*refused"):
        ckpt.load_checkpoint(legacy)
    assert not marker.exists()
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match=r"empty\.pt: empty file \(0 bytes\)"):
        ckpt.load_checkpoint(tmp_path / "empty.pt")
    good = _save(tmp_path)
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ckpt.CheckpointError, match=r"cut\.pt: cannot be read as a training checkpoint: truncated"):
        ckpt.load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint .it is a folder."):
        ckpt.load_checkpoint(tmp_path)
    torch.save({"model": {"llama_proj.weight": torch.zeros(1)}, "epoch": 3}, tmp_path / "release.pth")
    with pytest.raises(ckpt.CheckpointError, match="looks like a released TinyGPT-V checkpoint: load it with "
                                                   "tinygptv_lib.weights.load_release_checkpoint"):
        ckpt.load_checkpoint(tmp_path / "release.pth")
    newer = _save(tmp_path, "newer.pt", version=ckpt.VERSION + 1)
    with pytest.raises(ckpt.CheckpointError, match="newer version of this project"):
        ckpt.load_checkpoint(newer)
    partial = ckpt.atomic_save({"format": ckpt.FORMAT, "preset": "nano"}, tmp_path / "partial.pt")
    with pytest.raises(ckpt.CheckpointError, match="incomplete checkpoint, missing stage, step, trainable"):
        ckpt.load_checkpoint(partial)


SAVER = """
import sys, torch
from tinygptv_lib.train.checkpoint import atomic_save
i = 0
while True:
    atomic_save({"format": "tinygptv-train-checkpoint", "i": i, "w": torch.full((1 << 20,), float(i))}, sys.argv[1])
    print(i, flush=True)
    i += 1
"""


def test_sigkill_at_any_moment_of_a_save_leaves_the_last_checkpoint_readable(tmp_path):
    """A process saving 4 MB checkpoints in a loop is killed at 6 different moments."""
    path = tmp_path / "last.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for delay in (0.0, 0.003, 0.011, 0.023, 0.037, 0.051):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, env=env)
        proc.stdout.readline()  # one save done
        time.sleep(delay)
        proc.kill()
        proc.wait()
        proc.stdout.close()
        obj = torch.load(path, weights_only=True)
        assert torch.equal(obj["w"], torch.full((1 << 20,), float(obj["i"])))  # whole, not torn
    ckpt.atomic_save({"format": ckpt.FORMAT}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # a killed save's temporary file is cleared


# =========================================================================== 5. training faults


def _cli_config(tmp_path, steps_per_ckpt=1000):
    import yaml

    from tinygptv_lib.train.config import load_stage_config

    cfg = load_stage_config(1, "nano", overrides={"batch_size": 2, "checkpoint_every": steps_per_ckpt,
                                                  "data_root": str(SAMPLES)})
    d = cfg.to_dict()
    d["betas"] = list(d["betas"])
    path = tmp_path / "stage1.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_sigint_saves_and_exits_cleanly_then_resume_finishes(tmp_path):
    cfg = _cli_config(tmp_path)
    out = tmp_path / "run"
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tinygptv_lib.cli", "train", "--stage", "1", "--config", str(cfg), "--steps", "40",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    step = ckpt.load_checkpoint(out / "last.pt", preset="nano", stage=1)["step"]
    assert 2 <= step < 40 and f"checkpoint saved at step {step}" in stderr and "--resume" in stderr
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert ckpt.load_checkpoint(out / "final.pt")["step"] == 40


def test_nonfinite_run_stops_with_a_clear_message_from_the_command_line(tmp_path, monkeypatch, capsys):
    from tinygptv_lib import cli
    from tinygptv_lib.train import trainer

    def stop(self, resume=False):
        raise trainer.TrainingStopped("stage 1: 10 steps in a row had a non-finite loss or gradient (last at step 9)")

    monkeypatch.setattr(trainer.Trainer, "run", stop)
    rc = cli.main(["train", "--stage", "1", "--config", str(_cli_config(tmp_path)), "--out", str(tmp_path / "o")])
    assert rc == 1
    assert "stopped: stage 1: 10 steps in a row had a non-finite loss" in capsys.readouterr().err
