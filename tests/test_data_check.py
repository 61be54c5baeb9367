"""`data check`: the shipped samples pass every stage; a damaged tree reports every problem at once."""
import argparse
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from tinygptv_lib.data import check as C
from tinygptv_lib.data import generate as G
from tinygptv_lib.data.formats import ShardSample, write_shard

SAMPLES = Path(__file__).resolve().parent.parent / "data_samples"
SMALL = dict(seed=5, n_train=7, n_eval=3, n_instruct=3, shard_size=4, image_size=96)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("check") / "clean"
    G.generate_all(out, **SMALL)
    return out


@pytest.fixture
def tree(generated, tmp_path):
    """A fresh copy of the small generated tree, free to damage."""
    return Path(shutil.copytree(generated, tmp_path / "data"))


def find(report, dataset, **want):
    """Problems of a dataset whose fields contain the wanted substrings."""
    return [p for p in report.problems if p.dataset == dataset
            and all(value in (getattr(p, key) or "") for key, value in want.items())]


# --------------------------------------------------------------------------- clean data


@pytest.mark.parametrize("stage", [1, 2, 3, 4, "eval"])
def test_shipped_samples_pass_every_stage(stage, capsys):
    report = C.check_stage(stage, SAMPLES)
    assert report.layout == "samples"
    assert report.ok, report.format()
    checked = [d for d in report.datasets if d.status == "ok"]
    assert checked and all(d.records > 0 and d.images > 0 and d.opened == d.images for d in checked)
    assert C.main(["--stage", str(stage), "--root", str(SAMPLES)]) == 0
    assert "result: clean" in capsys.readouterr().out


def test_sample_counts_match_the_manifest():
    counts = json.loads((SAMPLES / "manifest.json").read_text())["counts"]
    assert C.check_stage(1, SAMPLES).counts["shapes_pairs"] == counts["pairs"]
    assert C.check_stage(3, SAMPLES).counts["cc_sbu_align"] == counts["cc_sbu_align"]
    stage4 = C.check_stage(4, SAMPLES).counts
    assert stage4["coco_vqa"] == counts["vqa_questions"]
    assert stage4["gqa"] == counts["gqa_questions"]
    assert stage4["refcoco"] == counts["refcoco_refs"]
    assert stage4["llava_detail"] == counts["llava"]
    assert C.check_stage("eval", SAMPLES).counts["vsr"] == counts["eval_vsr"]


def test_generated_tree_passes(generated):
    for stage in (1, 3, 4, "eval"):
        assert C.check_stage(stage, generated).ok


def test_sample_tree_lists_the_real_datasets_it_does_not_imitate():
    report = C.check_stage(4, SAMPLES)
    status = {d.name: d.status for d in report.datasets}
    assert status["llava_reason"] == status["okvqa"] == status["vg_refer"] == "not covered"
    assert status["shapes_multitask"] == "ok"
    assert any("does not imitate" in note for note in report.notes)


def test_max_images_limits_the_images_opened_but_not_the_existence_check():
    report = C.check_stage(3, SAMPLES, max_images=5)
    (align,) = report.datasets
    assert (align.images, align.opened, align.decoded) == (40, 5, 5)


# --------------------------------------------------------------------------- damaged data


def test_missing_image_and_malformed_records_are_all_reported(tree, capsys):
    (tree / "vqa/images/000000000002.jpg").unlink()
    detail = json.loads((tree / "llava/detail.json").read_text())
    del detail[0]["conversations"]  # a missing key ...
    detail[2]["conversations"][1]["from"] = "human"  # ... and a second bad record in the same file
    (tree / "llava/detail.json").write_text(json.dumps(detail))
    text = (tree / "gqa/train_balanced_questions.json").read_text()
    (tree / "gqa/train_balanced_questions.json").write_text(text[: len(text) // 2])  # truncated JSON

    report = C.check_stage(4, tree)
    assert not report.ok
    (missing,) = find(report, "coco_vqa", kind="image")
    assert missing.field == str((tree / "vqa/images/000000000002.jpg").resolve())
    assert missing.file.endswith("vqa/questions.json") and missing.record.startswith("record 3 (question_id 2000)")
    assert "image file not found" in missing.reason
    (no_key,) = find(report, "llava_detail", field="conversations", reason="missing")
    assert no_key.file.endswith("llava/detail.json") and no_key.record == "record 0 (id '000000000000')"
    (wrong_role,) = find(report, "llava_detail", field="conversations[1].from")
    assert wrong_role.record == "record 2 (id '000000000002')"
    (broken,) = find(report, "gqa", reason="invalid JSON")
    assert broken.file.endswith("gqa/train_balanced_questions.json")
    assert {d.name: d.records for d in report.datasets}["llava_detail"] == 1  # the good record still counts
    assert len(report.problems) == 4

    assert C.main(["--stage", "4", "--root", str(tree)]) == 1
    out = capsys.readouterr().out
    assert "llava/detail.json: record 0 (id '000000000000'): field 'conversations': missing" in out
    assert "image vqa/images/000000000002.jpg: image file not found" in out
    assert "result: 4 problem(s) found" in out


def test_vqa_join_problems_name_the_right_file(tree):
    questions = json.loads((tree / "vqa/questions.json").read_text())
    del questions["questions"][1]["question"]
    (tree / "vqa/questions.json").write_text(json.dumps(questions))
    annotations = json.loads((tree / "vqa/annotations.json").read_text())
    annotations["annotations"][4]["answers"].pop()
    (tree / "vqa/annotations.json").write_text(json.dumps(annotations))
    report = C.check_stage(4, tree, skip=["gqa"])
    (q,) = find(report, "coco_vqa", field="question")
    assert q.file.endswith("vqa/questions.json") and q.record.startswith("record 1 ")
    (a,) = find(report, "coco_vqa", field="answers")
    assert a.file.endswith("vqa/annotations.json") and a.record.startswith("record 4 ")
    assert "expected 10 answers, got 9" in a.reason
    assert len(report.problems) == 2  # the question of the bad annotation is not blamed twice


def test_broken_and_undecodable_images_are_reported(tree):
    path = tree / "cc_sbu_align/image/1.jpg"
    path.write_bytes(path.read_bytes()[:300])  # header intact, pixels cut
    report = C.check_stage(3, tree)
    (bad,) = report.problems
    assert bad.kind == "image" and bad.field == str(path.resolve()) and "does not open" in bad.reason


def test_missing_dataset_folder_is_reported(tree):
    shutil.rmtree(tree / "refcoco")
    report = C.check_stage(4, tree)
    (gone,) = find(report, "refcoco")
    assert gone.kind == "missing" and gone.file == str(tree / "refcoco") and "dataset missing" in gone.reason
    assert {d.name: d.status for d in report.datasets}["refcoco"] == "missing"


def test_real_layout_expects_the_real_datasets():
    report = C.check_stage(1, SAMPLES, layout="real")
    assert {p.dataset for p in report.problems} == {"laion", "cc_sbu"}
    assert all(p.kind == "missing" and "see docs/DATA_GUIDE.md" in p.reason for p in report.problems)
    assert C.check_stage(3, SAMPLES, layout="real").ok  # cc_sbu_align has the same layout in both


def test_shard_problems(tree):
    shards = tree / "stage1_2/shards"
    data = (shards / "000001.tar").read_bytes()
    (shards / "000001.tar").write_bytes(data[: len(data) // 2])  # cut: tarfile itself would not notice
    write_shard(shards / "000002.tar", [ShardSample("0000020000", b"\xff\xd8\xff" + b"not a jpeg", "a cap")])
    with tarfile.open(shards / "000003.tar", "w") as tar:  # an image without its caption
        info = tarfile.TarInfo("0000030000.jpg")
        image = (tree / "cc_sbu_align/image/0.jpg").read_bytes()
        info.size = len(image)
        tar.addfile(info, io.BytesIO(image))
    report = C.check_stage(1, tree)
    assert len(find(report, "shapes_pairs", file="000001.tar", reason="end-of-archive")) == 1
    assert len(find(report, "shapes_pairs", file="000002.tar", kind="image")) == 1
    (no_caption,) = find(report, "shapes_pairs", file="000003.tar")
    assert no_caption.field == "txt" and "key '0000030000'" in no_caption.record
    assert len(report.problems) == 3


def test_benchmark_problems_are_all_reported(tree):
    lines = (tree / "eval/vsr/test.jsonl").read_text().splitlines()
    lines[0] = lines[0].replace('"label":', '"lbl":')
    lines.append("{not json")
    (tree / "eval/vsr/test.jsonl").write_text("\n".join(lines) + "\n")
    folder = tree / "eval/iconqa/val/choose_txt"
    item = json.loads((folder / "2/data.json").read_text())
    item["answer"] = 9
    (folder / "2/data.json").write_text(json.dumps(item))
    (folder / "3/data.json").unlink()
    report = C.check_stage("eval", tree)
    assert find(report, "vsr", record="line 1", field="label")
    assert find(report, "vsr", record="line 4", reason="invalid JSON")
    assert find(report, "iconqa", record="problem '2'", field="answer")
    assert find(report, "iconqa", record="problem '3'", reason="data.json is missing")
    assert len(report.problems) == 4


def test_register_adds_data_check(capsys):
    parser = argparse.ArgumentParser(prog="tinygptv")
    C.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "check", "--stage", "3", "--root", str(SAMPLES), "--max-images", "3"])
    assert (args.command, args.data_command, args.stage, args.max_images) == ("data", "check", 3, 3)
    assert args.func(args) == 0
    assert "cc_sbu_align" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "check", "--stage", "5", "--root", "x"])
    assert C.main(["--stage", "3", "--root", str(SAMPLES), "--skip", "no_such_set"]) == 2


def test_unknown_root_is_a_problem_not_a_crash(tmp_path):
    report = C.check_stage(3, tmp_path / "nowhere")
    assert not report.ok and report.problems[0].kind == "missing"


def test_full_stage_configs_read_where_the_data_check_looks():
    """Every dataset of the full configs sits at a path `data check` validates (docs/DATA_GUIDE.md)."""
    from tinygptv_lib.data.check import STAGES
    from tinygptv_lib.train.config import load_stage_config

    for stage in (1, 2, 3, 4):
        checked = {p for spec in STAGES[stage] if spec.real for p in spec.paths}
        for d in load_stage_config(stage, "full").datasets:
            where = {p for p in checked if p == d["path"] or p.startswith(d["path"].rstrip("/") + "/")}
            assert where, f"stage {stage}: {d['name']} reads {d['path']}, which data check never looks at"
            if "image_root" in d:
                assert d["image_root"] in checked, f"stage {stage}: {d['name']} image_root {d['image_root']}"
