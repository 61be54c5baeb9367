"""The five benchmarks end to end on the shipped shapes-world samples (data_samples/eval): a small
random nano model runs through every path, and a fake generator / fake loss that knows the labels
scores 1.0 under both protocols (the scoring is wired to the labels)."""
import argparse
import collections
import csv
import io
from pathlib import Path

import pytest
import torch

from tinygptv_lib.data.formats import read_gqa, read_hateful_memes, read_iconqa, read_vizwiz, read_vsr
from tinygptv_lib.eval import benchmarks as B
from tinygptv_lib.model.sequence import build_batch
from tinygptv_lib.model.tinygptv import build_model
from tinygptv_lib.tokenizer import load_tokenizer

EVAL = Path(__file__).resolve().parent.parent / "data_samples" / "eval"
LIMIT = 6


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("nano", stage=4).eval()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def right_answers(name: str) -> list:
    """The label of each shipped item, read with our readers independently of the evaluator."""
    d = EVAL / name
    if name == "gqa":
        return [r.answer for r in read_gqa(d / "testdev_balanced_questions.json", d / "images")]
    if name == "vsr":
        return ["true" if r.label else "false" for r in read_vsr(d / "test.jsonl", d / "images")]
    if name == "vizwiz":  # the most frequent human answer
        return [collections.Counter(a["answer"] for a in r.answers).most_common(1)[0][0]
                for r in read_vizwiz(d / "val.json", d / "val")]
    if name == "hm":
        return ["yes" if r.label else "no" for r in read_hateful_memes(d / "dev.jsonl")]
    raise ValueError(name)


def fake_generator(answers: list):
    """Stands in for greedy_generate: hands out `answers` in item order, checking the call."""
    queue = list(answers)

    def generate(model, tokenizer, prompts, *, pixels=None, max_new_tokens=20, stop=("###",)):
        assert max_new_tokens == 20 and stop == ("###",)
        assert pixels is not None and pixels.shape[0] == len(prompts)
        assert all(p.startswith("[INST] <Img><ImageHere></Img> ") and p.endswith(" [/INST]") for p in prompts)
        out, queue[:] = queue[:len(prompts)], queue[len(prompts):]
        return out

    return generate


# --------------------------------------------------------------------------- layout and prompts


@pytest.mark.parametrize("name", B.BENCHMARKS)
def test_items_from_every_layout(name):
    """--data may name the benchmark folder, the folder holding all five, or the data root."""
    a = B.load_items(name, EVAL / name, limit=3)
    assert [i.key for i in a] == [i.key for i in B.load_items(name, EVAL, limit=3)]
    assert [i.key for i in a] == [i.key for i in B.load_items(name, EVAL.parent, limit=3)]
    assert len(a) == 3 and all(i.image_path.is_file() for i in a)
    assert all(i.prompt.startswith("[INST] <Img><ImageHere></Img> ") and i.prompt.endswith(" [/INST]") for i in a)


def test_original_prompts(tmp_path):
    gqa = B.load_items("gqa", EVAL, limit=1)[0]
    assert gqa.prompt == ("[INST] <Img><ImageHere></Img> [vqa] Based on the image, respond to this question with "
                          "a short answer: What colour is the star? [/INST]")
    vsr = B.load_items("vsr", EVAL, limit=1)[0]
    assert "[vqa] Based on the image, is this statement true or false? The star is to the left" in vsr.prompt
    viz = B.load_items("vizwiz", EVAL, limit=1)[0]
    assert "[vqa] The question is 'Is there a yellow diamond?' Based on the image, answer the question with a " \
           "single word or phrase. and reply 'unanswerable' when" in viz.prompt
    hm = B.load_items("hm", EVAL, limit=1)[0]
    assert "This is an image writting 'two circles'. Is this image hateful? Answer yes or no. Answer: [/INST]" \
        in hm.prompt
    icon = B.load_items("iconqa", EVAL, limit=1)[0]
    assert icon.choices == ("star", "square") and icon.label == 1
    with pytest.raises(FileNotFoundError, match="testdev_balanced_questions.json"):
        B.load_items("gqa", tmp_path)
    with pytest.raises(ValueError):
        B.load_items("okvqa", EVAL)


# --------------------------------------------------------------------------- a random nano model


@pytest.mark.parametrize("name", B.BENCHMARKS)
def test_random_model_runs_every_benchmark(model, tok, name):
    r = B.evaluate_benchmark(model, name, EVAL / name, protocol="original", batch_size=4, limit=LIMIT,
                             tokenizer=tok)
    assert r["benchmark"] == name and r["n"] == LIMIT and len(r["predictions"]) == LIMIT
    assert 0.0 <= r["score"] <= 1.0 and r["score"] == r["scores"]["original"]
    assert all(0.0 <= r["scores"][p] <= 1.0 for p in B.PROTOCOLS)
    if name == "iconqa":
        assert all(len(p["losses"]) == len(p["choices"]) for p in r["predictions"])
    else:
        assert all(isinstance(p["answer"], str) for p in r["predictions"])
    if name == "hm":
        assert set(r["auc"]) == set(B.PROTOCOLS)
    md, table = B.results_table({name: r})
    assert "TinyGPT-V paper (%)" in md and "ours, original (%)" in md and "ours, standard (%)" in md
    rows = list(csv.reader(io.StringIO(table)))
    assert rows[0] == ["benchmark", "n", "TinyGPT-V paper (%)", "ours, original (%)", "ours, standard (%)"]
    assert rows[1][0] == B.TITLES[name] and float(rows[1][2]) == B.PAPER[name]
    assert float(rows[1][3]) == pytest.approx(100 * r["scores"]["original"], abs=0.051)


def test_candidate_losses_equal_the_training_loss(model, tok):
    """Each batched, right-padded row's mean loss is the model's own loss on that sample alone."""
    prompt = B.TEMPLATE.format("[vqa] What shape is it?")
    answers = ["star", "a large blue hexagon", "square"]
    pixels = torch.randn(1, 3, model.cfg.vision.img_size, model.cfg.vision.img_size)
    emb = model.encode_images(pixels)
    batched = B.candidate_losses(model, tok, [prompt] * 3, answers, emb.expand(3, -1, -1))
    sums = B.candidate_losses(model, tok, [prompt] * 3, answers, emb.expand(3, -1, -1), reduction="sum")
    q = model.cfg.qformer.num_query_tokens
    for a, got, got_sum in zip(answers, batched, sums):
        one = build_batch(tok, [prompt], [a], num_query_tokens=q, end_sym="###", max_txt_len=1024)
        with torch.no_grad():
            out = model(one, image_embeds=emb)
        assert got == pytest.approx(out["loss"].item(), abs=1e-4)
        assert got_sum == pytest.approx(out["loss"].item() * out["num_targets"], rel=1e-4)


# --------------------------------------------------------------------------- scoring wired to the labels


@pytest.mark.parametrize("name", ["gqa", "vsr", "vizwiz", "hm"])
def test_right_answers_score_one_under_both_protocols(model, tok, monkeypatch, name):
    monkeypatch.setattr(B, "greedy_generate", fake_generator(right_answers(name)))
    r = B.evaluate_benchmark(model, name, EVAL / name, protocol="standard", batch_size=4, limit=LIMIT,
                             tokenizer=tok)
    assert r["scores"] == {"original": 1.0, "standard": 1.0} and r["score"] == 1.0
    if name == "hm":
        assert r["auc"] == {"original": 1.0, "standard": 1.0}


@pytest.mark.parametrize("name", ["vsr", "hm"])
def test_inverted_answers_score_zero(model, tok, monkeypatch, name):
    flip = {"true": "false", "false": "true", "yes": "no", "no": "yes"}
    monkeypatch.setattr(B, "greedy_generate", fake_generator([flip[a] for a in right_answers(name)]))
    r = B.evaluate_benchmark(model, name, EVAL / name, batch_size=4, limit=LIMIT, tokenizer=tok)
    assert r["scores"] == {"original": 0.0, "standard": 0.0}


def test_iconqa_right_choice_scores_one(model, tok, monkeypatch):
    expected = [(tuple(r.choices), r.answer) for r in read_iconqa(EVAL / "iconqa" / "val" / "choose_txt")]

    def fake_losses(model, tokenizer, prompts, answers, image_embeds, reduction="mean"):
        assert image_embeds.shape[0] == len(answers) == len(prompts)
        out, at = [], 0
        while at < len(answers):
            choices, right = expected.pop(0)
            assert tuple(answers[at:at + len(choices)]) == choices
            out += [0.5 if k == right else 3.0 for k in range(len(choices))]
            at += len(choices)
        return out

    monkeypatch.setattr(B, "candidate_losses", fake_losses)
    r = B.evaluate_benchmark(model, "iconqa", EVAL / "iconqa", batch_size=4, limit=LIMIT, tokenizer=tok)
    assert r["scores"] == {"original": 1.0, "standard": 1.0}
    assert [p["prediction"] for p in r["predictions"]] == [p["label"] for p in r["predictions"]]


# --------------------------------------------------------------------------- table and command


def test_results_table_all_five():
    results = {n: {"title": B.TITLES[n], "n": 10, "scores": {"original": 0.5, "standard": 0.25}, "data": "d"}
               for n in B.BENCHMARKS}
    md, table = B.results_table(results)
    rows = list(csv.reader(io.StringIO(table)))
    assert [r[0] for r in rows[1:]] == ["GQA", "VSR", "IconQA", "VizWiz", "Hateful Memes", "avg"]
    assert rows[-1][2:] == ["46.0", "50.0", "25.0"]  # the paper's average is 46.0
    assert "| GQA | 10 | 38.9 | 50.0 | 25.0 |" in md
    md1, table1 = B.results_table(results, protocols=("standard",))
    assert "original" not in table1.splitlines()[0]
    with pytest.raises(ValueError):
        B.results_table(results, protocols=("lenient",))


def test_command(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="tinygptv")
    B.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--benchmark", "hm", "--data", str(EVAL / "hm"), "--limit", "2",
                              "--out", str(tmp_path)])
    assert args.func is B.run and args.protocol == "both"
    assert B.main(["--benchmark", "hm", "--data", str(EVAL), "--limit", "2", "--protocol", "original",
                   "--out", str(tmp_path), "--device", "cpu"]) == 0
    md = (tmp_path / "results.md").read_text()
    assert "Hateful Memes" in md and "ours, original (%)" in md and "standard" not in md.splitlines()[0]
    assert (tmp_path / "results.csv").read_text().startswith("benchmark,n,TinyGPT-V paper (%)")
    assert (tmp_path / "predictions.json").is_file()


def test_checkpoint_is_loaded(tmp_path):
    """--checkpoint: a trainer's final.pt goes into a stage-4 nano model at its training image size."""
    from tinygptv_lib.train.checkpoint import save_checkpoint
    from tinygptv_lib.weights.common import WeightLoadError

    trained = build_model("nano", stage=4)
    with torch.no_grad():
        trained.projection.proj1.weight.fill_(0.125)
    path = save_checkpoint(tmp_path / "final.pt", model=trained, optimizer=None, step=1, preset="nano", stage=4,
                           config={"image_size": 224, "seed": 42})
    try:
        m = B.build_eval_model(path, device="cpu")
    except WeightLoadError as e:  # the nano backbones are built by `python -m tinygptv_lib.pretrain`
        pytest.skip(f"nano backbones not built: {str(e)[:80]}")
    assert m.cfg.vision.img_size == 224 and not m.training
    assert torch.equal(m.projection.proj1.weight, trained.projection.proj1.weight)
