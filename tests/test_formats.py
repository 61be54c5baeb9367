"""On-disk formats: round trips, byte-determinism, the shipped samples, and clear errors."""
import hashlib
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from tinygptv_lib.data import formats as F
from tinygptv_lib.data import generate as G
from tinygptv_lib.data import world as W

SAMPLES = Path(__file__).resolve().parent.parent / "data_samples"
SMALL = dict(n_train=7, n_eval=3, n_instruct=2, shard_size=4, image_size=96)


def tree_hashes(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def tiny_image(path: Path, colour=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


# --------------------------------------------------------------------------- determinism


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "out"
    G.generate_all(out, seed=5, **SMALL)
    return out


def test_same_seed_gives_identical_bytes(small_tree, tmp_path):
    G.generate_all(tmp_path / "again", seed=5, **SMALL)
    first, second = tree_hashes(small_tree), tree_hashes(tmp_path / "again")
    assert first == second
    assert len(first) > 40


def test_different_seed_gives_different_data(small_tree, tmp_path):
    G.generate_all(tmp_path / "other", seed=6, **SMALL)
    first, other = tree_hashes(small_tree), tree_hashes(tmp_path / "other")
    assert first.keys() == other.keys()
    changed = [k for k in first if first[k] != other[k]]
    assert len(changed) > 0.8 * len(first)


def test_tree_layout_and_manifest(small_tree):
    manifest = json.loads((small_tree / "manifest.json").read_text())
    assert manifest["parameters"] == {"seed": 5, "n_train": 7, "n_eval": 3, "n_instruct": 2,
                                      "image_size": 96, "shard_size": 4}
    assert sorted(p.name for p in (small_tree / "stage1_2" / "shards").iterdir()) == ["000000.tar", "000001.tar"]
    for rel in ("cc_sbu_align/filter_cap.json", "llava/multitask.json", "vqa/annotations.json",
                "gqa/train_balanced_questions.json", "refcoco/refs.json",
                "eval/gqa/testdev_balanced_questions.json", "eval/vsr/test.jsonl", "eval/vizwiz/val.json",
                "eval/hm/dev.jsonl", "eval/iconqa/val/choose_txt/1/data.json"):
        assert (small_tree / rel).is_file(), rel
    assert set(manifest["files"]) == {k for k in tree_hashes(small_tree) if k != "manifest.json"}
    with tarfile.open(small_tree / "stage1_2" / "shards" / "000000.tar") as tar:
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in tar.getmembers())


def test_train_and_eval_images_do_not_overlap(small_tree):
    train = {hashlib.sha256(F.open_image(p).tobytes()).hexdigest()
             for p in (small_tree / "llava" / "images").iterdir()}
    evals = {hashlib.sha256(F.open_image(p).tobytes()).hexdigest()
             for p in (small_tree / "eval" / "vsr" / "images").iterdir()}
    assert train and evals and not train & evals


def test_rerun_replaces_own_output_but_refuses_foreign_folders(small_tree, tmp_path):
    G.generate_all(small_tree, seed=5, **SMALL)  # a second run over its own output is fine
    foreign = tmp_path / "foreign"
    (foreign / "eval").mkdir(parents=True)
    (foreign / "eval" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        G.generate_all(foreign, seed=5, **SMALL)
    assert (foreign / "eval" / "precious.txt").read_text() == "keep me"


def test_command_line(tmp_path, capsys):
    assert G.main(["--out", str(tmp_path / "cli"), "--seed", "2", "--n-train", "3", "--n-eval", "2",
                   "--size", "64", "--n-instruct", "1"]) == 0
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert manifest["parameters"]["image_size"] == 64
    assert F.open_image(tmp_path / "cli" / "eval" / "vsr" / "images" / "000000000000.jpg").size == (64, 64)
    assert "wrote" in capsys.readouterr().out


# --------------------------------------------------------------------------- round trips


def test_shard_round_trip(tmp_path):
    image = Image.new("RGB", (16, 12), (1, 2, 3))
    png = F.encode_image(image, "png")
    samples = [F.ShardSample("000000000", png, "a red circle", {"key": "000000000", "w": 16}),
               F.ShardSample("000000001", F.encode_image(image, "jpg"), "ünïcode caption", None)]
    path = tmp_path / "s" / "000000.tar"
    assert F.write_shard(path, samples) == 2
    back = list(F.read_shard(path))
    assert back == samples
    assert back[0].decode().tobytes() == image.tobytes()
    assert list(F.read_shards(tmp_path / "s")) == samples


def test_align_round_trip(tmp_path):
    records = [F.AlignRecord("2", "A long description."), F.AlignRecord("3", "Another one.")]
    for r in records:
        tiny_image(tmp_path / "image" / f"{r.image_id}.jpg")
    F.write_cc_sbu_align(tmp_path, records)
    back = F.read_cc_sbu_align(tmp_path)
    assert back == records
    assert back[0].image_path == (tmp_path / "image" / "2.jpg").resolve()


def test_llava_round_trip(tmp_path):
    tiny_image(tmp_path / "img" / "a.jpg")
    records = [
        F.ConversationRecord("a", "a.jpg", [{"from": "human", "value": "<image>\nWhat?"},
                                            {"from": "gpt", "value": "That."}]),
        F.ConversationRecord("t", None, [{"from": "human", "value": "Text only?"}, {"from": "gpt", "value": "Yes."}]),
    ]
    F.write_llava(tmp_path / "chat.json", records)
    back = F.read_llava(tmp_path / "chat.json", tmp_path / "img")
    assert back == records and back[1].image_path is None


def test_vqav2_and_gqa_round_trip(tmp_path):
    tiny_image(tmp_path / "images" / "000000000007.jpg")
    records = [F.VQARecord(7001, 7, "How many?", ["2"] * 9 + ["two"], "2", "number"),
               F.VQARecord(7002, 7, "What colour?", ["red"] * 10, "red", None)]
    F.write_vqav2(tmp_path / "q.json", tmp_path / "a.json", records)
    assert F.read_vqav2(tmp_path / "q.json", tmp_path / "a.json", tmp_path / "images") == records
    tiny_image(tmp_path / "gqa" / "n12.jpg")
    gqa = [F.GQARecord("0001", "n12", "Is it red?", "yes", "Yes, it is red.")]
    F.write_gqa(tmp_path / "gqa.json", gqa)
    assert F.read_gqa(tmp_path / "gqa.json", tmp_path / "gqa") == gqa


def test_refcoco_round_trip_and_conversion(tmp_path):
    tiny_image(tmp_path / "COCO_train2014_000000000009.jpg")
    records = [F.RefRecord(0, "COCO_train2014_000000000009.jpg", ["the cat", "left cat"], [1.5, 2, 4, 5], 8, 8)]
    F.write_refcoco(tmp_path / "refs.json", records)
    back = F.read_refcoco(tmp_path / "refs.json", tmp_path)
    assert back == records and back[0].box_xyxy == (1.5, 2, 5.5, 7)
    refs = [{"ref_id": 0, "ann_id": 77, "image_id": 9, "split": "train",
             "file_name": "COCO_train2014_000000000009_77.jpg",
             "sentences": [{"sent": "the cat", "raw": "The cat"}, {"sent": "left cat", "raw": "left cat"}]}]
    instances = {"images": [{"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "width": 8, "height": 8}],
                 "annotations": [{"id": 77, "bbox": [1.5, 2, 4, 5], "image_id": 9}]}
    assert F.convert_refcoco(refs, instances) == records


def test_benchmark_round_trips(tmp_path):
    tiny_image(tmp_path / "vsr" / "1.jpg")
    vsr = [F.VSRRecord("1.jpg", "The cat is left of the dog.", 1, "left of")]
    F.write_vsr(tmp_path / "vsr.jsonl", vsr)
    assert F.read_vsr(tmp_path / "vsr.jsonl", tmp_path / "vsr") == vsr

    icon = [F.IconQARecord("12", "How many?", ["1", "2", "3"], 2), F.IconQARecord("3", "Which?", ["a", "b"], 0)]
    F.write_iconqa(tmp_path / "icon", icon)
    for r in icon:
        tiny_image(tmp_path / "icon" / r.pid / "image.png")
    assert F.read_iconqa(tmp_path / "icon") == sorted(icon, key=lambda r: int(r.pid))

    tiny_image(tmp_path / "viz" / "VizWiz_val_00000000.jpg")
    answers = [{"answer": "red", "answer_confidence": "yes"}] * 9 + [{"answer": "pink", "answer_confidence": "no"}]
    viz = [F.VizWizRecord("VizWiz_val_00000000.jpg", "What colour?", answers, 1, "other")]
    F.write_vizwiz(tmp_path / "val.json", viz)
    assert F.read_vizwiz(tmp_path / "val.json", tmp_path / "viz") == viz

    tiny_image(tmp_path / "hm" / "img" / "00042.png")
    memes = [F.MemeRecord(42, "img/00042.png", 0, "two circles")]
    F.write_hateful_memes(tmp_path / "hm" / "dev.jsonl", memes)
    assert F.read_hateful_memes(tmp_path / "hm" / "dev.jsonl") == memes


def test_generated_records_read_back_like_the_world_made_them(small_tree):
    """The files carry exactly what the world functions produce for the same scene seeds."""
    sample = next(F.read_shards(small_tree / "stage1_2" / "shards"))
    scene = W.make_scene(sample.meta["scene"]["seed"], 96)
    assert sample.caption == W.short_caption(scene)
    assert sample.decode().size == (96, 96)
    refs = F.read_refcoco(small_tree / "refcoco" / "refs.json", small_tree / "refcoco" / "images")
    for ref in refs:
        text = W.box_to_text(ref.box_xyxy, ref.width, ref.height)
        assert all(0 <= v <= 100 for v in W.parse_boxes(text)[0])
    memes = F.read_hateful_memes(small_tree / "eval" / "hm" / "dev.jsonl")
    for meme in memes:
        claim = W.parse_claim(meme.text)
        assert meme.label in (0, 1) and claim.count <= 5


# --------------------------------------------------------------------------- the shipped samples


def read_everything(root: Path, check_images: bool = True) -> dict:
    """Every reader on one generated tree; returns the records by dataset."""
    ev = root / "eval"
    return {
        "pairs": list(F.read_shards(root / "stage1_2" / "shards")),
        "cc_sbu_align": F.read_cc_sbu_align(root / "cc_sbu_align", check_images),
        "llava": [F.read_llava(root / "llava" / f"{name}.json", root / "llava" / "images", check_images)
                  for name in ("conversation", "detail", "multitask")],
        "vqa": F.read_vqav2(root / "vqa" / "questions.json", root / "vqa" / "annotations.json",
                            root / "vqa" / "images", check_images=check_images),
        "gqa": F.read_gqa(root / "gqa" / "train_balanced_questions.json", root / "gqa" / "images", check_images),
        "refcoco": F.read_refcoco(root / "refcoco" / "refs.json", root / "refcoco" / "images", check_images),
        "eval_gqa": F.read_gqa(ev / "gqa" / "testdev_balanced_questions.json", ev / "gqa" / "images", check_images),
        "eval_vsr": F.read_vsr(ev / "vsr" / "test.jsonl", ev / "vsr" / "images", check_images),
        "eval_iconqa": F.read_iconqa(ev / "iconqa" / "val" / "choose_txt", check_images),
        "eval_vizwiz": F.read_vizwiz(ev / "vizwiz" / "val.json", ev / "vizwiz" / "val", check_images),
        "eval_hm": F.read_hateful_memes(ev / "hm" / "dev.jsonl", check_images=check_images),
    }


def test_shipped_samples_are_readable_by_every_reader():
    manifest = json.loads((SAMPLES / "manifest.json").read_text())
    data = read_everything(SAMPLES)
    counts = manifest["counts"]
    assert len(data["pairs"]) == counts["pairs"] >= 150
    assert len(data["cc_sbu_align"]) == counts["cc_sbu_align"]
    assert all(len(d) == counts["llava"] for d in data["llava"])
    assert len(data["vqa"]) == counts["vqa_questions"]
    assert len(data["refcoco"]) == counts["refcoco_refs"]
    for name in ("eval_gqa", "eval_vsr", "eval_iconqa", "eval_vizwiz", "eval_hm"):
        assert len(data[name]) == counts[name] >= 40
    assert {r.label for r in data["eval_hm"]} == {0, 1}
    assert {r.answerable for r in data["eval_vizwiz"]} == {0, 1}


def test_shipped_samples_match_their_manifest_and_budget():
    manifest = json.loads((SAMPLES / "manifest.json").read_text())
    for rel, entry in manifest["files"].items():
        data = (SAMPLES / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], rel
    total = sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file())
    assert total < 8_000_000
    photos = sorted((SAMPLES / "photos").glob("*.jpg"))
    assert 3 <= len(photos) <= 5 and all(p.stat().st_size < 300_000 for p in photos)
    licences = (SAMPLES / "photos" / "LICENSES.md").read_text()
    assert all(p.name in licences for p in photos)


def _pixels_close(a: bytes, b: bytes) -> bool:
    """Decoded images equal up to codec differences between machines (mean |diff| < 2 levels)."""
    ia, ib = F.open_image(a), F.open_image(b)
    if ia.size != ib.size:
        return False
    diff = sum(abs(x - y) for x, y in zip(ia.tobytes(), ib.tobytes()))
    return diff / len(ia.tobytes()) < 2.0


def test_shipped_samples_are_what_the_generator_makes(tmp_path):
    """Regenerate with the recorded parameters: texts byte-identical, images equal in pixels.

    Pixels, not bytes, because JPEG/PNG encoders may differ between Pillow builds.
    """
    manifest = json.loads((SAMPLES / "manifest.json").read_text())
    fresh = tmp_path / "fresh"
    new = G.generate_all(fresh, **manifest["parameters"])
    assert new["counts"] == manifest["counts"]
    assert new["files"].keys() == manifest["files"].keys()
    for rel in manifest["files"]:
        old_bytes, new_bytes = (SAMPLES / rel).read_bytes(), (fresh / rel).read_bytes()
        suffix = Path(rel).suffix
        if suffix in (".json", ".jsonl"):
            assert old_bytes == new_bytes, rel
        elif suffix in (".jpg", ".png"):
            assert old_bytes == new_bytes or _pixels_close(old_bytes, new_bytes), rel
        elif suffix == ".tar" and old_bytes != new_bytes:
            for old, new_sample in zip(F.read_shard(SAMPLES / rel), F.read_shard(fresh / rel), strict=True):
                assert (old.key, old.caption, old.meta) == (new_sample.key, new_sample.caption, new_sample.meta)
                assert _pixels_close(old.image, new_sample.image)


# --------------------------------------------------------------------------- malformed records


def _vqa_files(tmp_path, annotation_edit):
    F.write_vqav2(tmp_path / "q.json", tmp_path / "a.json",
                  [F.VQARecord(k, 1, "Q?", ["x"] * 10, "x") for k in (10, 11, 12)])
    data = json.loads((tmp_path / "a.json").read_text())
    annotation_edit(data["annotations"][1])
    (tmp_path / "a.json").write_text(json.dumps(data))
    return lambda: F.read_vqav2(tmp_path / "q.json", tmp_path / "a.json", tmp_path, check_images=False)


@pytest.mark.parametrize("edit, field, problem", [
    (lambda a: a.pop("multiple_choice_answer"), "multiple_choice_answer", "missing"),
    (lambda a: a.update(question_id="11"), "question_id", "expected an integer"),
    (lambda a: a["answers"].pop(), "answers", "expected 10 answers"),
    (lambda a: a["answers"][3].update(answer=5), "answers[3].answer", "expected a string"),
])
def test_vqa_errors_name_file_record_and_field(tmp_path, edit, field, problem):
    read = _vqa_files(tmp_path, edit)
    with pytest.raises(F.DataFormatError) as info:
        read()
    err = info.value
    message = str(err)
    assert isinstance(err, ValueError)
    assert "a.json" in message and "record 1" in message and repr(field) in message and problem in message
    assert err.field == field and err.file.endswith("a.json")


def test_error_survives_pickling():
    err = F.DataFormatError("x/dev.jsonl", "line 3", "label", "expected 0 or 1, got 2")
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) == "x/dev.jsonl: line 3: field 'label': expected 0 or 1, got 2"
    assert (back.file, back.record, back.field) == ("x/dev.jsonl", "line 3", "label")


def test_jsonl_error_names_the_line(tmp_path):
    path = tmp_path / "dev.jsonl"
    path.write_text('{"id": 1, "img": "img/1.png", "label": 0, "text": "a"}\n'
                    '{"id": 2, "img": "img/2.png", "label": true, "text": "b"}\n')
    with pytest.raises(F.DataFormatError, match=r"dev\.jsonl: line 2 \(id 2\): field 'label': expected an integer"):
        F.read_hateful_memes(path, check_images=False)
    path.write_text('{"image": "a.jpg", "caption": "c", "label": 2, "relation": "near"}\n')
    with pytest.raises(F.DataFormatError, match=r"line 1: field 'label': expected 0 or 1"):
        F.read_vsr(path, tmp_path, check_images=False)
    path.write_text('{"broken": \n')
    with pytest.raises(F.DataFormatError, match="invalid JSON"):
        F.read_vsr(path, tmp_path)


def test_structured_errors_in_other_formats(tmp_path):
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"id": "q", "image": "a.jpg", "conversations": [
        {"from": "human", "value": "<image>\nHi"}, {"from": "human", "value": "again"}]}]))
    with pytest.raises(F.DataFormatError, match=r"record 0 \(id 'q'\): field 'conversations\[1\]\.from'"):
        F.read_llava(chat, tmp_path, check_images=False)

    (tmp_path / "icon" / "7").mkdir(parents=True)
    (tmp_path / "icon" / "7" / "data.json").write_text(json.dumps(
        {"question": "q", "choices": ["a", "b"], "answer": 2, "ques_type": "choose_txt"}))
    with pytest.raises(F.DataFormatError, match=r"data\.json: problem '7': field 'answer'"):
        F.read_iconqa(tmp_path / "icon", check_images=False)

    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps([{"ref_id": 4, "image": "a.jpg", "sentences": ["x"], "bbox": [0, 0, 50, 5],
                                 "width": 10, "height": 10}]))
    with pytest.raises(F.DataFormatError, match=r"record 0 \(ref_id 4\): field 'bbox': box .* outside"):
        F.read_refcoco(refs, tmp_path, check_images=False)

    (tmp_path / "filter_cap.json").write_text(json.dumps({"annotations": [{"image_id": 5, "caption": "c"}]}))
    with pytest.raises(F.DataFormatError, match=r"filter_cap\.json: record 0: field 'image_id'"):
        F.read_cc_sbu_align(tmp_path)


def test_missing_image_is_reported(tmp_path):
    F.write_vsr(tmp_path / "t.jsonl", [F.VSRRecord("nope.jpg", "c", 1, "above")])
    with pytest.raises(F.DataFormatError, match="image file not found"):
        F.read_vsr(tmp_path / "t.jsonl", tmp_path)
    assert F.read_vsr(tmp_path / "t.jsonl", tmp_path, check_images=False)[0].image == "nope.jpg"


def test_shard_errors(tmp_path):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("k1.jpg", F.encode_image(Image.new("RGB", (4, 4)), "jpg")), ("k1.txt", b"ok"),
                           ("k2.jpg", F.encode_image(Image.new("RGB", (4, 4)), "jpg"))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples = F.read_shard(path)
    assert next(samples).caption == "ok"
    with pytest.raises(F.DataFormatError, match=r"bad\.tar: sample 1 \(key 'k2'\): field 'txt': no caption"):
        next(samples)
    (tmp_path / "notatar.tar").write_bytes(b"hello")
    with pytest.raises(F.DataFormatError, match="not a readable tar"):
        list(F.read_shard(tmp_path / "notatar.tar"))


# --------------------------------------------------------------------------- paths that escape the root


@pytest.mark.parametrize("bad", ["../outside.jpg", "img/../../outside.jpg", "/etc/passwd", "img/../../../etc/hosts"])
def test_paths_escaping_the_root_are_refused(tmp_path, bad):
    root = tmp_path / "hm"
    tiny_image(tmp_path / "outside.jpg")  # exists, but outside the root
    root.mkdir()
    (root / "dev.jsonl").write_text(json.dumps({"id": 9, "img": bad, "label": 0, "text": "t"}) + "\n")
    with pytest.raises(F.DataFormatError, match=r"dev\.jsonl: line 1 \(id 9\): field 'img': (absolute path|path .* escapes)"):
        F.read_hateful_memes(root / "dev.jsonl")
    with pytest.raises(F.DataFormatError):  # refused even when existence is not checked
        F.read_hateful_memes(root / "dev.jsonl", check_images=False)


def test_symlink_out_of_the_root_is_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    target = tiny_image(tmp_path / "secret.jpg")
    try:
        os.symlink(target, root / "link.jpg")
    except (OSError, NotImplementedError):
        pytest.skip("symbolic links are not available here")
    F.write_vsr(root / "t.jsonl", [F.VSRRecord("link.jpg", "c", 1, "above")])
    with pytest.raises(F.DataFormatError, match="escapes"):
        F.read_vsr(root / "t.jsonl", root)


def test_image_id_cannot_escape_in_cc_sbu_align(tmp_path):
    (tmp_path / "filter_cap.json").write_text(json.dumps({"annotations": [{"image_id": "../../x", "caption": "c"}]}))
    with pytest.raises(F.DataFormatError, match="escapes"):
        F.read_cc_sbu_align(tmp_path, check_images=False)
