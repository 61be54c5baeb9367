"""Inference: decoding (cache, stops, batching, streaming, sampling), box text, `tinygptv chat` and
the chat widget. The real nano model (shipped backbones) where behaviour matters; a scripted model
where an exact token sequence is needed (a stop string split over two tokens, EOS)."""
import io
import sys
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tinygptv_lib.cli import _stage_model, main
from tinygptv_lib.data import world as W
from tinygptv_lib.data.images import preprocess
from tinygptv_lib.infer import boxes as B
from tinygptv_lib.infer import chat as C
from tinygptv_lib.infer.generate import (
    EOS_ID,
    _top_p_filter,
    build_prompt,
    generate,
    greedy_generate,
    stream_generate,
)
from tinygptv_lib.tokenizer import load_tokenizer



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return _stage_model("nano", 4).eval()


@pytest.fixture(scope="module")
def scenes():
    return [W.make_scene(W.derive_seed(7, "test_infer", i), 224) for i in range(3)]


def pixels(model, images):
    return torch.stack([preprocess(im, model.cfg.vision.img_size) for im in images])


# --------------------------------------------------------------------------- a scripted model


class _ScriptedBody(torch.nn.Module):
    """Phi's body for the scripted model: its last hidden state carries the token row r must emit next."""

    def __init__(self, scripts):
        super().__init__()
        self.scripts = scripts
        self.calls = 0  # the prompt pass, then one call per generated token

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None, cache=None,
                use_cache=None):
        k, self.calls = self.calls, self.calls + 1
        wanted = [script[k] if k < len(script) else EOS_ID for script in self.scripts]
        hidden = torch.tensor(wanted, dtype=torch.float64).reshape(-1, 1, 1)
        return SimpleNamespace(last_hidden_state=hidden, cache="cache" if use_cache else None)


class _OneHotHead(torch.nn.Module):
    def forward(self, hidden):
        logits = torch.zeros(hidden.shape[0], 51200)
        logits[torch.arange(hidden.shape[0]), hidden[:, 0].long()] = 10.0
        return logits


class _ScriptedPhi(torch.nn.Module):
    """Emits row r's script one token per step (then EOS), whatever the input: exact stop tests."""

    def __init__(self, scripts):
        super().__init__()
        self.model = _ScriptedBody(scripts)
        self.lm_head = _OneHotHead()
        self.embed = torch.nn.Embedding(51200, 4)

    def get_input_embeddings(self):
        return self.embed


class _ScriptedModel(torch.nn.Module):
    def __init__(self, scripts):
        super().__init__()
        self.phi = _ScriptedPhi(scripts)
        self.cfg = SimpleNamespace(qformer=SimpleNamespace(num_query_tokens=2))

    def embed(self, batch, pixels=None, queries=None, image_embeds=None):
        return torch.zeros(*batch.input_ids.shape, 4)


def scripted(tok, *texts_or_ids):
    scripts = [t if isinstance(t, list) else tok(t, add_special_tokens=False)["input_ids"] for t in texts_or_ids]
    return _ScriptedModel(scripts)


# --------------------------------------------------------------------------- decoding


def test_cache_gives_the_same_tokens_as_recomputing(model, tok, scenes):
    prompts = [build_prompt("Describe this image in detail.", "stage3"),
               build_prompt("What colour is the star?", "stage4", "vqa"),
               build_prompt("the red circle", "stage4", "refer")]
    px = pixels(model, [s.image for s in scenes])
    cached = generate(model, tok, prompts, pixels=px, max_new_tokens=16, stop=(), eos_id=None)
    full = generate(model, tok, prompts, pixels=px, max_new_tokens=16, stop=(), eos_id=None, use_cache=False)
    assert [len(t) for t in cached.tokens] == [16, 16, 16]  # stops ignored: exactly 16 tokens
    assert cached.tokens == full.tokens
    assert cached.finish_reasons == ["length"] * 3


def test_batched_equals_one_at_a_time(model, tok, scenes):
    prompts = [build_prompt("Describe this image in detail.", "stage3"),
               build_prompt("How many shapes are there?", "stage4", "vqa"),
               build_prompt("Is there a large shape at the top left of the picture?", "stage4", "vqa")]
    px = pixels(model, [s.image for s in scenes])
    batched = generate(model, tok, prompts, pixels=px, max_new_tokens=12)
    assert len(set(batched.prompt_tokens)) == 3  # different lengths: left padding is exercised
    for i, p in enumerate(prompts):
        alone = generate(model, tok, p, pixels=px[i:i + 1], max_new_tokens=12)
        assert alone.tokens[0] == batched.tokens[i]
        assert alone.texts[0] == batched.texts[i]
    assert greedy_generate(model, tok, prompts, pixels=px, max_new_tokens=12) == batched.texts


def test_stop_string_split_over_two_tokens(tok):
    ids = tok(" yes", add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("#"),
                                                                tok.convert_tokens_to_ids("##")]
    assert tok.decode(ids) == " yes###" and len(ids) == 3  # '#' then '##': no single token holds the stop
    after = tok(" never shown", add_special_tokens=False)["input_ids"]
    for use_cache in (True, False):
        out = generate(scripted(tok, ids + after), tok, "q", max_new_tokens=20, use_cache=use_cache)
        assert out.texts == ["yes"] and out.finish_reasons == ["stop"]
        assert out.tokens == [ids]  # nothing generated after the stop
    pieces = list(stream_generate(scripted(tok, ids + after), tok, "q", max_new_tokens=20))
    assert "".join(pieces) == "yes" and not any("#" in p for p in pieces)


def test_eos_and_length(tok):
    hello = tok(" hello there", add_special_tokens=False)["input_ids"]
    out = generate(scripted(tok, hello + [EOS_ID] + hello), tok, "q", max_new_tokens=20)
    assert out.texts == ["hello there"] and out.finish_reasons == ["eos"] and out.tokens == [hello]
    cut = generate(scripted(tok, hello * 5), tok, "q", max_new_tokens=3)
    assert cut.finish_reasons == ["length"] and len(cut.tokens[0]) == 3
    rows = generate(scripted(tok, " a###", hello, hello * 5), tok, ["q", "qq", "qqq"], max_new_tokens=4)
    assert rows.finish_reasons == ["stop", "eos", "length"]
    assert rows.texts == ["a", "hello there", tok.decode((hello * 5)[:4]).strip()]


def test_stream_pieces_join_to_the_answer(model, tok, scenes):
    # scripted: leading space, a multi-byte character split over tokens, '#'s that are not a stop
    text = " caf\u00e9 \U0001F600 ok ## # done"
    ids = tok(text + "###", add_special_tokens=False)["input_ids"]
    full = generate(scripted(tok, ids), tok, "q", max_new_tokens=40).texts[0]
    pieces = list(stream_generate(scripted(tok, ids), tok, "q", max_new_tokens=40))
    assert "".join(pieces) == full == text.strip()
    assert len(pieces) > 3 and not any("\ufffd" in p for p in pieces)
    # the real model, greedy and sampled, with the callback too
    px = pixels(model, [scenes[0].image])
    for kwargs in ({}, {"do_sample": True, "top_p": 0.9, "seed": 3, "repetition_penalty": 1.05}):
        prompt = build_prompt("Describe this image in detail.", "stage3")
        answer = generate(model, tok, prompt, pixels=px, max_new_tokens=16, **kwargs).texts[0]
        seen = []
        pieces = list(stream_generate(model, tok, prompt, pixels=px, max_new_tokens=16, callback=seen.append,
                                      **kwargs))
        assert "".join(pieces) == answer and seen == pieces and len(pieces) > 1
        via_callback = []
        generate(model, tok, prompt, pixels=px, max_new_tokens=16, callback=via_callback.append, **kwargs)
        assert via_callback == pieces


def test_sampling_is_seeded_and_degenerates_to_greedy(model, tok, scenes):
    px = pixels(model, [scenes[1].image])
    prompt = build_prompt("Describe this image in detail.", "stage3")
    kw = {"pixels": px, "max_new_tokens": 10, "stop": (), "eos_id": None}
    greedy = generate(model, tok, prompt, **kw).tokens
    a = generate(model, tok, prompt, do_sample=True, seed=5, **kw).tokens
    assert a == generate(model, tok, prompt, do_sample=True, seed=5, **kw).tokens
    assert a == generate(model, tok, prompt, do_sample=True, generator=torch.Generator().manual_seed(5), **kw).tokens
    others = [generate(model, tok, prompt, do_sample=True, seed=s, **kw).tokens for s in (6, 7)]
    assert any(o != a for o in others) and any(o != greedy for o in [a] + others)  # it does sample
    assert generate(model, tok, prompt, do_sample=True, seed=1, top_p=0.0, **kw).tokens == greedy
    assert generate(model, tok, prompt, do_sample=True, seed=1, top_p=1e-9, **kw).tokens == greedy
    assert generate(model, tok, prompt, do_sample=True, seed=1, temperature=0.0, **kw).tokens == greedy
    assert generate(model, tok, prompt, do_sample=True, seed=1, temperature=1e-5, **kw).tokens == greedy


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    assert torch.isfinite(_top_p_filter(logits, 0.7)).tolist() == [[True, True, False]]
    assert torch.isfinite(_top_p_filter(logits, 0.5)).tolist() == [[True, False, False]]
    assert torch.isfinite(_top_p_filter(logits, 0.0)).tolist() == [[True, False, False]]
    assert torch.isfinite(_top_p_filter(logits, 1.0)).all()


def test_repetition_penalty(model, tok):
    # the mechanism, exactly: A (logit 10) beats B (logit 9) until A has been seen once
    a, b = 317, 347
    fake = scripted(tok, [])
    fake.phi.model.forward = lambda **k: SimpleNamespace(last_hidden_state=torch.zeros(1, 1, 1), cache=1)
    fake.phi.lm_head.forward = lambda hidden: torch.tensor(
        [[0.0] * a + [10.0] + [0.0] * (b - a - 1) + [9.0] + [0.0] * (51199 - b)])
    assert generate(fake, tok, "q", max_new_tokens=4, stop=()).tokens == [[a, a, a, a]]
    assert generate(fake, tok, "q", max_new_tokens=4, stop=(), repetition_penalty=2.0).tokens == [[a, b, a, a]]
    # the real model's repetitive description gets fewer repeated tokens
    px = pixels(model, [W.make_scene(3, 224).image])
    kw = {"pixels": px, "max_new_tokens": 24, "stop": (), "eos_id": None}
    prompt = build_prompt("Describe this image in detail.", "stage3")
    plain = generate(model, tok, prompt, **kw).tokens[0]
    penalised = generate(model, tok, prompt, repetition_penalty=1.3, **kw).tokens[0]
    assert penalised != plain
    assert len(penalised) - len(set(penalised)) < len(plain) - len(set(plain))


def test_bad_arguments(model, tok):
    with pytest.raises(ValueError, match="top_p"):
        generate(model, tok, "hi", top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, tok, "hi", do_sample=True, temperature=-1)
    with pytest.raises(ValueError, match="callback streams one answer"):
        generate(model, tok, ["a", "b"], callback=print)


def test_prompt_templates():
    assert build_prompt("What colour is it?", "stage4", "vqa") == \
        "[INST] <Img><ImageHere></Img> [vqa] What colour is it? [/INST]"
    assert build_prompt("the red circle", "stage4", "[refer]") == \
        "[INST] <Img><ImageHere></Img> [refer] the red circle [/INST]"
    assert build_prompt("Describe this image in detail.", "stage3") == \
        "###Human: <Img><ImageHere></Img> Describe this image in detail. ###Assistant: "
    assert build_prompt("hello", "stage4", image=False) == "[INST] hello [/INST]"
    with pytest.raises(ValueError, match="task must be one of"):
        build_prompt("x", "stage4", "[count]")
    with pytest.raises(ValueError, match="stage-4 template"):
        build_prompt("x", "stage3", "vqa")
    with pytest.raises(ValueError, match="template must be"):
        build_prompt("x", "stage5")


# --------------------------------------------------------------------------- boxes


@pytest.mark.parametrize("text", [
    "{<1><2><3>}",                      # three numbers
    "the box {<1><2><3><4>",            # cut off before '}'
    "{<1><2><3><4><5>}",                # five numbers
    "{<a><2><3><4>}",                   # not a number
    "{<1><2><3><101>}",                 # above 100
    "{<50><2><3><4>}",                  # x1 > x2
    "{<><><><><><33><33>}",             # what an untrained model wrote
    "ok {<1><2><3><4>} then {<5><6>",   # a good box, then a broken one
    "{<1.5><2><3><4>}",                 # not an integer
])
def test_malformed_boxes_raise_a_clear_error(text):
    with pytest.raises(B.BoxFormatError) as e:
        B.parse_boxes(text)
    msg = str(e.value)
    assert repr(text)[:60] in msg or text[:40] in msg  # names the text
    assert "expected '{<x1><y1><x2><y2>}'" in msg        # and what was expected
    assert isinstance(e.value, ValueError)
    with pytest.raises(B.BoxFormatError):
        W.box_from_text(text, 100, 100)
    lenient = B.parse_boxes(text, strict=False)
    assert lenient == ([(1, 2, 3, 4)] if text.startswith("ok") else [])


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="{}<>0123456789-. ab", max_size=40))
def test_any_text_parses_or_raises_the_box_error(text):
    try:
        boxes = B.parse_boxes(text)
    except B.BoxFormatError:
        return
    assert all(len(b) == 4 and all(0 <= v <= 100 for v in b) for b in boxes)


def test_boxes_read_back_with_their_phrases():
    text = ("<p>a red circle</p> {<1><2><3><4>} and <p>two blue squares</p> {<5><6><7><8>}<delim>{<9><10><11><12>}"
            " on a grey background. {<0><0><1><1>}")
    found = B.find_boxes(text)
    assert [f.box for f in found] == [(1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12), (0, 0, 1, 1)]
    assert [f.label for f in found] == ["a red circle", "two blue squares", "two blue squares", None]
    assert B.parse_boxes("no boxes at all, {just braces} and <p>tags</p>") == []
    scene = W.make_scene(11, 224)
    grounded = B.find_boxes(W.grounded_caption(scene))
    assert len(grounded) == len(scene.objects) and all(f.label for f in grounded)
    with pytest.raises(TypeError):
        B.parse_boxes(None)


def test_world_uses_the_one_implementation():
    assert W.parse_boxes is B.parse_boxes and W.box_to_text is B.box_to_text
    assert W.box_from_text is B.box_from_text and W.iou is B.iou


@pytest.mark.parametrize("size", [(224, 224), (112, 112), (640, 480), (7, 333), (1, 1)])
def test_pixel_round_trips(size):
    w, h = size
    for v in range(101):  # 0..100 -> pixels -> 0..100 is exact
        assert B.to_hundred(B.to_pixels((v, v, 100 - v // 2, 100), w, h), w, h) == (v, v, 100 - v // 2, 100)
    g = torch.Generator().manual_seed(w * 1000 + h)
    for _ in range(200):
        xs = sorted((torch.rand(2, generator=g) * w).tolist())
        ys = sorted((torch.rand(2, generator=g) * h).tolist())
        px = (xs[0], ys[0], xs[1], ys[1])
        back = B.box_from_text(B.box_to_text(px, w, h), w, h)
        assert all(abs(a - b) <= max(w, h) / 200 + 1e-9 for a, b in zip(px, back))
    with pytest.raises(ValueError):
        B.to_pixels((1, 2, 3, 4), 0, 10)


def test_draw_boxes_marks_the_box_edges():
    image = Image.new("RGB", (100, 100), (128, 128, 128))
    plain = B.figure_png(B.draw_boxes(image, []))
    drawn = B.figure_png(B.draw_boxes(image, [(10, 10, 60, 60)], ["thing"]))
    a = Image.open(io.BytesIO(plain)).convert("RGB")
    b = Image.open(io.BytesIO(drawn)).convert("RGB")
    assert a.size == b.size == (500, 500)  # 5 x 5 inches at 100 dpi: 5 figure pixels per image pixel
    from PIL import ImageChops

    x1, y1, x2, y2 = ImageChops.difference(a, b).getbbox()
    assert abs(x1 - 50) <= 6 and abs(y1 - 50) <= 6 and abs(x2 - 300) <= 6 and abs(y2 - 300) <= 6
    fig = B.draw_answer(image, "<p>a thing</p> {<10><10><60><60>} and {<1><2>")
    assert fig is not None and B.draw_answer(image, "no box") is None
    with pytest.raises(ValueError, match="labels"):
        B.draw_boxes(image, [(1, 2, 3, 4)], ["a", "b"])


# --------------------------------------------------------------------------- the chat command


@pytest.fixture(scope="module")
def trained(tmp_path_factory, scenes):
    """A stage-4 course folder whose checkpoint differs visibly from the untrained projections."""
    from tinygptv_lib.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    m = _stage_model("nano", 4)
    m.set_stage(4)
    with torch.no_grad():  # LoRA's B matrices start at zero; random ones change what Phi says
        g = torch.Generator().manual_seed(0)
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    root = tmp_path_factory.mktemp("chat")
    save_checkpoint(root / "course" / "stage4" / "final.pt", model=m, optimizer=None, step=1, preset="nano",
                    stage=4, config={"image_size": 112, "seed": 0})
    image = root / "scene.png"
    scenes[2].image.save(image)
    return SimpleNamespace(model=m.eval(), root=root, course=root / "course", image=image)


def test_chat_answers_from_a_course_checkpoint(trained, model, tok, capsys):
    question = "What colour is the background?"  # the two models answer it differently
    prompt = build_prompt(question, "stage4", "vqa")
    px = pixels(trained.model, [Image.open(trained.image).convert("RGB")])
    expected = generate(trained.model, tok, prompt, pixels=px, max_new_tokens=10).texts[0]
    untrained = generate(model, tok, prompt, pixels=px, max_new_tokens=10).texts[0]
    assert expected != untrained  # so the answer below proves the checkpoint was loaded
    rc = main(["chat", "--image", str(trained.image), "--checkpoint", str(trained.course), "--task", "vqa",
               "--prompt", question, "--max-new-tokens", "10", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0 and out == expected + "\n"
    assert "stage4/final.pt" in err


def test_chat_loop_reads_stdin_until_an_empty_line(trained, model, monkeypatch, capsys):
    monkeypatch.setattr(C, "load_chat_model", lambda *a, **k: (model, 4))
    monkeypatch.setattr(sys, "stdin", io.StringIO("What colour is the star?\nHow many shapes?\n\nnot asked\n"))
    assert main(["chat", "--image", str(trained.image), "--checkpoint", str(trained.course),
                 "--max-new-tokens", "6", "--sample", "--seed", "1"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2 and err.count("you> ") == 3
    monkeypatch.setattr(sys, "stdin", io.StringIO("How many shapes?"))  # EOF without a newline
    assert main(["chat", "--image", str(trained.image), "--checkpoint", str(trained.course),
                 "--max-new-tokens", "6"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_chat_saves_the_boxes(trained, model, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(C, "load_chat_model", lambda *a, **k: (model, 4))

    def ask(self, question, task=None, callback=None, **kw):
        callback("<p>the star</p> {<10><20><50><60>}")
        return "<p>the star</p> {<10><20><50><60>}"

    monkeypatch.setattr(C.ChatSession, "ask", ask)
    out = tmp_path / "boxes.png"
    assert main(["chat", "--image", str(trained.image), "--checkpoint", str(trained.course), "--task", "refer",
                 "--prompt", "the star", "--save-boxes", str(out)]) == 0
    assert Image.open(out).size == (500, 500)
    assert "boxes drawn" in capsys.readouterr().err


def test_chat_refuses_bad_inputs_cleanly(trained, tmp_path, capsys):
    assert main(["chat", "--image", str(tmp_path / "missing.png"), "--prompt", "hi"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"error: {tmp_path / 'missing.png'}: no such image file\n"  # one line, no traceback
    assert main(["chat", "--image", str(trained.image), "--checkpoint", str(tmp_path / "nowhere"),
                 "--prompt", "hi"]) == 2
    assert "no such checkpoint file or folder" in capsys.readouterr().err
    assert main(["chat", "--image", str(trained.image), "--release", "x.pth", "--checkpoint", "y"]) == 2
    assert main(["chat", "--image", str(trained.image), "--save-boxes", str(tmp_path / "no" / "b.png")]) == 2
    assert "its folder does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without final.pt"):
        C.resolve_checkpoint(tmp_path / "empty")
    stage = trained.course / "stage4"
    assert C.resolve_checkpoint(stage) == C.resolve_checkpoint(trained.course) == C.resolve_checkpoint(
        stage / "final.pt")


# --------------------------------------------------------------------------- the widget


def test_widget_builds_and_answers(model, tok, scenes):
    import ipywidgets

    from tinygptv_lib.widgets import ChatWidget, shipped_images

    offered = shipped_images()
    assert sum(k.startswith("photo: ") for k in offered) >= 1
    assert sum(k.startswith("shapes world") for k in offered) == 3
    w = ChatWidget(model, tok, images={"scene": lambda: scenes[0].image}, max_new_tokens=8)
    assert isinstance(w.box, ipywidgets.VBox) and w.view.value[:4] == b"\x89PNG"
    w.task.value = "vqa"
    answer = w.send("What colour is the star?")
    px = pixels(model, [scenes[0].image])
    assert answer == generate(model, tok, build_prompt("What colour is the star?", "stage4", "vqa"), pixels=px,
                              max_new_tokens=8).texts[0]
    assert "".join(o["text"] for o in w.output.outputs) == answer
    w.template.value = "stage3"
    assert w.task.disabled and w.task.value == ""
    # an upload replaces the image; a broken one reports the loader's error
    buf = io.BytesIO()
    scenes[1].image.save(buf, format="PNG")
    w._on_upload({"new": ({"name": "mine.png", "content": memoryview(buf.getvalue())},)})
    assert w.image.size == (224, 224) and w.status.value == ""
    w._on_upload({"new": ({"name": "bad.png", "content": memoryview(b"not an image")},)})
    assert "bad.png: not an image file" in w.status.value


def test_widget_draws_boxes_in_the_answer(model, tok, scenes, monkeypatch):
    from tinygptv_lib.widgets import ChatWidget

    w = ChatWidget(model, tok, images={"scene": lambda: scenes[0].image})
    before = w.view.value
    monkeypatch.setattr(w.session, "ask", lambda q, task=None, callback=None, **k: "{<10><10><50><50>}")
    assert w.send("the red circle") == "{<10><10><50><50>}"
    assert w.view.value != before and w.view.value[:4] == b"\x89PNG" and "boxes drawn" in w.status.value


def test_decode_head_equals_the_linear_head_on_the_tokenizer_rows():
    from tinygptv_lib.infer.generate import _DecodeHead

    torch.manual_seed(0)
    lm_head = torch.nn.Linear(16, 300)
    head = _DecodeHead(lm_head, vocab=250)
    for rows in (1, 3):  # one row: the transposed copy; several: weight @ hidden.T
        hidden = torch.randn(rows, 16)
        got = head(hidden)
        assert got.shape == (rows, 300)
        assert torch.allclose(got[:, :250], lm_head(hidden)[:, :250], atol=1e-6)
        assert torch.isneginf(got[:, 250:]).all()  # padding rows past the tokenizer: never drawn
    assert head._transposed is not None and head._transposed.shape == (16, 300)
    no_bias = torch.nn.Linear(16, 300, bias=False)
    hidden = torch.randn(2, 16)
    assert torch.allclose(_DecodeHead(no_bias, 300)(hidden), no_bias(hidden), atol=1e-6)


def test_decode_head_keeps_its_transposed_copy_until_the_weight_changes():
    from tinygptv_lib.infer.generate import _DecodeHead

    lm_head = torch.nn.Linear(8, 40)
    hidden = torch.randn(1, 8)
    first = _DecodeHead(lm_head, 40)
    first(hidden)
    second = _DecodeHead(lm_head, 40)
    second(hidden)
    assert second._transposed is first._transposed  # one copy for two calls
    with torch.no_grad():
        lm_head.weight.mul_(2.0)  # an optimiser step or a load changes it in place
    third = _DecodeHead(lm_head, 40)
    assert torch.allclose(third(hidden), lm_head(hidden), atol=1e-6)
    assert third._transposed is not first._transposed


def test_decode_head_splits_one_row_into_chunks_with_several_threads():
    from tinygptv_lib.infer.generate import _DecodeHead

    torch.manual_seed(0)
    lm_head = torch.nn.Linear(16, 320)  # 320 rows: 8 chunks of 40
    hidden = torch.randn(1, 16)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        head = _DecodeHead(lm_head, vocab=300)
        got = head(hidden)
    finally:
        torch.set_num_threads(old)
    assert head._transposed is None  # the chunked product needs no transposed copy
    assert torch.allclose(got[:, :300], lm_head(hidden)[:, :300], atol=1e-6)
    assert torch.isneginf(got[:, 300:]).all()


@pytest.fixture(scope="module")
def lora_model():
    """The nano stage-4 model with LoRA B away from its zero start, so merged LoRA changes the result."""
    torch.manual_seed(1)
    m = _stage_model("nano", 4)
    m.add_lora()
    m.eval()
    assert any("lora_B" in n for n, _ in m.phi.named_parameters())
    with torch.no_grad():
        for name, p in m.phi.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return m


def _module_path(monkeypatch):
    from tinygptv_lib.infer import lean_step

    monkeypatch.setattr(lean_step, "start", lambda *a, **k: None)


def test_lean_step_gives_the_modules_tokens_and_hidden_states(lora_model, tok, scenes, monkeypatch):
    from tinygptv_lib.infer import lean_step
    from tinygptv_lib.model.sequence import build_prompt_batch

    m = lora_model
    prompts = [build_prompt("Describe this image in detail.", "stage3"),
               build_prompt("What colour is the star?", "stage4", "vqa"),
               build_prompt("the red circle", "stage4", "refer")]
    px = pixels(m, [s.image for s in scenes])
    steps = []
    real_step = lean_step.LeanDecoder.step
    monkeypatch.setattr(lean_step.LeanDecoder, "step", lambda self, *a: steps.append(1) or real_step(self, *a))
    lean = generate(m, tok, prompts, pixels=px, max_new_tokens=12, stop=(), eos_id=None)
    assert len(steps) == 11  # the lean step ran every token after the first (the padded batch included)
    full = generate(m, tok, prompts, pixels=px, max_new_tokens=12, stop=(), eos_id=None, use_cache=False)
    with monkeypatch.context() as mp:
        _module_path(mp)
        modules = generate(m, tok, prompts, pixels=px, max_new_tokens=12, stop=(), eos_id=None)
    assert lean.tokens == modules.tokens == full.tokens

    # the hidden state itself, one step on from a padded prompt, against the modules' cached step
    with torch.no_grad():
        batch = build_prompt_batch(tok, prompts, num_query_tokens=m.cfg.qformer.num_query_tokens)
        embeds = m.embed(batch, pixels=px)
        mask = batch.attention_mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = m.phi.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
        ids = torch.tensor([464, 2266, 257])
        lean = lean_step.start(m.phi, out.cache, mask, 1)
        step = lean.step(ids, positions[:, -1] + 1)
        with pytest.raises(ValueError, match="buffers hold"):  # one new position asked for, one used
            lean.step(ids, positions[:, -1] + 2)
        mask2 = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        ref = m.phi.model(input_ids=ids[:, None], attention_mask=mask2, position_ids=positions[:, -1:] + 1,
                          cache=out.cache, use_cache=True).last_hidden_state[:, -1]
    assert torch.allclose(step, ref, atol=1e-5), (step - ref).abs().max()


def test_lean_step_follows_a_changed_weight_and_steps_aside_where_it_is_not_exact(lora_model, tok, scenes,
                                                                                  monkeypatch):
    from tinygptv_lib.infer import lean_step

    m = lora_model
    prompt = build_prompt("What shape is the red one?", "stage4", "vqa")
    px = pixels(m, [scenes[0].image])
    before = generate(m, tok, prompt, pixels=px, max_new_tokens=10, stop=(), eos_id=None)  # merges and keeps
    lora_b = [p for n, p in m.phi.named_parameters() if "lora_B" in n]
    old = [p.detach().clone() for p in lora_b]
    try:
        with torch.no_grad():  # an optimiser step changes them in place: the kept merge must not be used
            for p in lora_b:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 2.0)
        lean = generate(m, tok, prompt, pixels=px, max_new_tokens=10, stop=(), eos_id=None)
        with monkeypatch.context() as mp:
            _module_path(mp)
            modules = generate(m, tok, prompt, pixels=px, max_new_tokens=10, stop=(), eos_id=None)
        assert modules.tokens != before.tokens  # the change matters to the answer
        assert lean.tokens == modules.tokens
    finally:
        with torch.no_grad():
            for p, o in zip(lora_b, old):
                p.copy_(o)

    kv = torch.zeros(1, 4, 5, 40)  # (rows, heads, positions, head dim) of the nano Phi
    batch_cache = SimpleNamespace(layers=[SimpleNamespace(keys=kv, values=kv)] * 4)
    mask = torch.ones(1, 5, dtype=torch.long)
    assert lean_step.start(m.phi, batch_cache, mask, 3) is not None
    assert lean_step.start(m.phi, SimpleNamespace(), mask, 3) is None  # a cache without per-layer tensors
    assert lean_step.start(m.phi, batch_cache, torch.ones(1, 6), 3) is None  # not the prompt's cache
    assert lean_step.start(_ScriptedPhi([[1]]), batch_cache, mask, 3) is None  # not our Phi
    m.phi.train()
    try:
        assert lean_step.start(m.phi, batch_cache, mask, 3) is None  # dropout would be on
    finally:
        m.phi.eval()
    half = _stage_model("nano", 4).eval().to(torch.bfloat16)
    assert lean_step.start(half.phi, batch_cache, mask, 3) is None  # bf16: the modules' rounding, not ours
