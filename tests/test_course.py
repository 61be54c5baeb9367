"""The course's report: how many held-out scenes a stage's scores rest on, and how precise they are."""
import pytest

from tinygptv_lib.cli import build_parser
from tinygptv_lib.course import EVAL_SCENES, ensure_stage, interval95, report_table


def _report(scenes):
    stage = {"role": "warm-up", "steps": 10, "first_loss": 2.0, "final_loss": 1.0, "train_seconds": 3.0,
             "eval_seconds": 1.0, "colour": 0.5, "count": 0.25, "refer_iou50": 0.0, "shape": 0.75}
    if scenes is not None:
        stage["eval_scenes"] = scenes
    return {"stages": {"1": stage, "2": dict(stage)}, "chance": {"colour": 0.125}, "total_seconds": 9}


def test_interval_is_the_normal_approximation_at_one_half():
    assert interval95(200) == pytest.approx(1.96 * 0.5 / 200 ** 0.5)
    assert interval95(60) == pytest.approx(0.1265, abs=1e-4) and interval95(EVAL_SCENES) < 0.07


def test_report_names_the_scene_count_and_keeps_it_out_of_the_metric_columns():
    table = report_table(_report(200))
    head = table.splitlines()[0]
    assert head == "| stage | what it adds | steps | loss first -> last | colour | count | refer_iou50 | shape | train s |"
    assert "held-out: 200 scenes a stage" in table and "about +-0.07" in table
    assert "held-out:" not in report_table(_report(None))  # reports written before the count was recorded


def test_bad_scene_counts_are_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="eval_scenes must be at least 1, got 0"):
        ensure_stage(1, tmp_path, eval_scenes=0)
    assert not any(tmp_path.iterdir())  # refused before any data or training
    parser = build_parser()
    assert parser.parse_args(["course"]).eval_scenes == EVAL_SCENES
    assert parser.parse_args(["course", "--eval-scenes", "50"]).eval_scenes == 50
    for bad in ("0", "-3", "many"):
        with pytest.raises(SystemExit):
            parser.parse_args(["course", "--eval-scenes", bad])
        assert f"expected a whole number of at least 1, got '{bad}'" in capsys.readouterr().err


def test_demo_asks_the_scenes_own_questions_with_their_answers():
    from tinygptv_lib.course import demo_questions
    from tinygptv_lib.data import world as W

    for i in range(5):
        scene = W.make_scene(W.derive_seed(0, "eval/demo", i), 224)
        asked = demo_questions(scene)
        items = {f"[vqa] {qa.question}": (qa.qtype, qa.answer) for qa in W.vqa_items(scene)}
        kinds = [items[q][0] for q, _ in asked]
        assert kinds == [k for k in ("colour", "shape", "count") if k in kinds] and len(set(kinds)) == len(kinds)
        assert "colour" in kinds and "count" in kinds  # every scene has a background colour and a count
        assert all(items[q][1] == truth for q, truth in asked)
    report = _report(200)
    report["demo"] = {"shapes-world scene 1": {"question": "[vqa] What colour is the square?", "answer": "red",
                                               "truth": "blue"},
                      "photo a.jpg": {"question": "[vqa] What colour is the background?", "answer": "grey"}}
    lines = report_table(report).splitlines()
    assert "demo (shapes-world scene 1): [vqa] What colour is the square? -> 'red' (truth 'blue')" in lines
    assert "demo (photo a.jpg): [vqa] What colour is the background? -> 'grey'" in lines


def test_refer_outcome_tells_a_loose_box_from_a_box_on_another_object():
    from tinygptv_lib.data import world as W
    from tinygptv_lib.eval.shapes import refer_outcome

    def loose(box):  # moved right by half its width: IoU 1/3 with where it was
        w = box[2] - box[0]
        return (box[0] + w // 2, box[1], box[2] + w // 2, box[3])

    def clear(scene):  # the first object's loose box touches no other object
        return len(scene.objects) >= 2 and all(W.iou(loose(scene.objects[0].bbox), o.bbox) == 0
                                               for o in scene.objects[1:])

    scene = next(s for s in (W.make_scene(W.derive_seed(0, "test/refer", i), 224) for i in range(100)) if clear(s))
    target, other = scene.objects[0].bbox, scene.objects[1].bbox
    text = lambda b: W.box_to_text(b, scene.width, scene.height)  # noqa: E731
    assert refer_outcome(f"here: {text(target)}", scene, target) == "right"
    assert 0 < W.iou(loose(target), target) <= 0.5
    assert refer_outcome(text(loose(target)), scene, target) == "imprecise"
    assert refer_outcome(text(other), scene, target) == "wrong object"
    assert refer_outcome("the red one", scene, target) == "no box"
    assert refer_outcome("{<1><2><3>}", scene, target) == "no box"
