"""Helpers the notebooks use: Q-Former attention maps and the shared plots."""
import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tinygptv_lib import plots  # noqa: E402
from tinygptv_lib.config import get_config  # noqa: E402
from tinygptv_lib.data.images import preprocess  # noqa: E402
from tinygptv_lib.data.world import make_scene  # noqa: E402
from tinygptv_lib.model.qformer import QFormer, cross_attention_maps  # noqa: E402


def test_cross_attention_maps_equal_eager_attention_weights():
    cfg = get_config("nano")
    qf = QFormer(cfg.qformer, encoder_width=24).eval()
    feats = torch.randn(2, 17, 24)
    maps = cross_attention_maps(qf, feats)
    assert sorted(maps) == [0, 2]  # cross-attention every 2nd layer
    qf.model.set_attn_implementation("eager")
    _, out = qf(feats, output_attentions=True)
    assert len(out.cross_attentions) == 2
    for got, want in zip((maps[0], maps[2]), out.cross_attentions):
        assert got.shape == (2, cfg.qformer.num_heads, cfg.qformer.num_query_tokens, 17)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 4, 32))


def test_cross_attention_maps_leave_no_hooks():
    qf = QFormer(get_config("nano").qformer, encoder_width=24).eval()
    cross_attention_maps(qf, torch.randn(1, 5, 24))
    assert all(not layer.crossattention.attention._forward_hooks
               for layer in qf.model.encoder.layer if layer.has_cross_attention)


def test_to_image_inverts_preprocess():
    img = make_scene(3, 112).image
    back = plots.to_image(preprocess(img, 112))
    assert back.shape == (112, 112, 3)
    assert abs(back * 255 - np.asarray(img, dtype="float32")).max() < 1e-3 * 255
    with pytest.raises(ValueError):
        plots.to_image(torch.zeros(1, 3, 8, 8))


def test_figures_build():
    img = make_scene(1, 64).image
    assert len(plots.show_images([img, preprocess(img, 28)], titles=["a", "b"]).axes) == 2
    fig = plots.heatmap_grid([torch.rand(4, 4) for _ in range(5)], ncols=3, image=img)
    assert len(fig.axes) == 6
    fig = plots.parameter_bars({"vision": {"total": 100, "trainable": 0}, "proj": {"total": 10, "trainable": 10}})
    assert fig.axes[0].get_xscale() == "log"


def test_sequence_kinds_mark_every_part():
    from tinygptv_lib.model.sequence import build_batch
    from tinygptv_lib.tokenizer import load_tokenizer

    batch = build_batch(load_tokenizer(), ["<ImageHere>", "Q: <ImageHere> colour?"], ["a red circle", "red"],
                        num_query_tokens=4, end_sym="\n")
    kinds = plots.sequence_kinds(batch)
    assert kinds[0].tolist()[:5] == [0, 1, 1, 1, 1]
    assert (kinds == 3).sum(1).tolist() == (batch.targets != -100).sum(1).tolist()
    assert (kinds[1] == 2).sum() > 0 and (kinds[0] == 4).sum() > 0  # prompt text; padding on the shorter row
    assert len(plots.sequence_layout(batch).axes) == 1
