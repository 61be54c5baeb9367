"""The one image loader: every awkward image is converted correctly or refused with a clear error."""
import io

import numpy as np
import pytest
from PIL import Image

from tinygptv_lib.data.images import CLIP_MEAN, CLIP_STD, ImageLoadError, load_image, preprocess


def save(img, path, **kw):
    img.save(path, **kw)
    return path


def test_plain_rgb_and_preprocess(tmp_path):
    p = save(Image.new("RGB", (30, 20), (255, 0, 0)), tmp_path / "red.png")
    x = preprocess(load_image(p), 28)
    assert x.shape == (3, 28, 28)
    assert x[0].mean().item() == pytest.approx((1 - CLIP_MEAN[0]) / CLIP_STD[0], abs=1e-4)
    assert x[1].mean().item() == pytest.approx((0 - CLIP_MEAN[1]) / CLIP_STD[1], abs=1e-4)


@pytest.mark.parametrize("make, reason", [
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: p.write_text("hello, I am not a picture"), "not an image file"),
    (lambda p: None, "no such image file"),
])
def test_refused_with_the_file_named(tmp_path, make, reason):
    p = tmp_path / "bad.jpg"
    make(p)
    with pytest.raises(ImageLoadError, match=f"bad.jpg: {reason}"):
        load_image(p)


def test_truncated_jpeg_is_refused(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    p = tmp_path / "cut.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="cut.jpg: cannot decode"):
        load_image(p)


def test_cmyk_grayscale_16bit_and_palette(tmp_path):
    cmyk = load_image(save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "c.jpg", quality=100))
    assert cmyk.mode == "RGB" and cmyk.getpixel((4, 4))[0] > 200 and cmyk.getpixel((4, 4))[1] < 60
    gray = load_image(save(Image.new("L", (8, 8), 128), tmp_path / "g.png"))
    assert gray.getpixel((0, 0)) == (128, 128, 128)
    arr16 = np.full((8, 8), 65535, dtype=np.uint16)
    sixteen = load_image(save(Image.fromarray(arr16), tmp_path / "w16.png"))
    assert sixteen.getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 255] + [0] * 765)
    pal.info["transparency"] = 0  # index 0 fully transparent
    out = load_image(save(pal, tmp_path / "p.png", transparency=0))
    assert out.getpixel((0, 0)) == (255, 255, 255)  # composited on white, not blue


def test_rgba_is_composited_on_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0, 255))
    out = load_image(save(img, tmp_path / "a.png"))
    assert out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((3, 3)) == (255, 255, 255)


def test_exif_orientation_is_honoured(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 20))  # white band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    p = save(img, tmp_path / "rot.jpg", exif=exif, quality=100)
    out = load_image(p)
    assert out.size == (20, 40)
    assert sum(out.getpixel((10, 2))) > 600  # the white band is now on top


def test_tiny_and_extreme_aspect_images_resize(tmp_path):
    one = load_image(save(Image.new("RGB", (1, 1), (9, 9, 9)), tmp_path / "1.png"))
    assert preprocess(one, 14).shape == (3, 14, 14)
    thin = load_image(save(Image.new("RGB", (2000, 3), (9, 9, 9)), tmp_path / "thin.png"))
    assert preprocess(thin, 14).shape == (3, 14, 14)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    p = save(Image.new("RGB", (64, 64)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64 x 64 is then over twice the limit
    with pytest.raises(ImageLoadError, match="bomb.png: refused, larger than PIL's decompression-bomb limit"):
        load_image(p)


def test_bytes_input(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (5, 5), (1, 2, 3)).save(buf, "PNG")
    assert load_image(buf.getvalue(), name="shard:key").getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(ImageLoadError, match="shard:key: empty image data"):
        load_image(b"", name="shard:key")
