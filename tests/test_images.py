"""`pipeline.lib.data.images`: decoding one file, every failure mode and colour mode, built in tmp_path."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, features

from pipeline.lib.data import images
from pipeline.lib.data.images import IMAGE_EXTENSIONS, RejectedImage, load_rgb, sha256_file

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
WEBP = features.check("webp")


def noise(h: int = 24, w: int = 32, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def reason_of(path: Path, **kwargs) -> str:
    with pytest.raises(RejectedImage) as info:
        load_rgb(path, SIZE, **kwargs)
    assert str(info.value) == info.value.reason
    return info.value.reason


def opened(path: Path, attr: str):
    with Image.open(path) as im:
        return getattr(im, attr)


def close(pixel, expected, tol: int = 6) -> bool:
    return bool(np.all(np.abs(np.asarray(pixel, int) - np.asarray(expected, int)) <= tol))


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A real decompression bomb: a side x side 1-bit grey PNG of zeros, a few tens of KB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
        )

    ihdr = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])  # bit depth 1, greyscale
    row = bytes(1 + (side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    parts = [comp.compress(row * 500) for _ in range(side // 500)] + [comp.flush()]
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr))
        fh.write(chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    return bomb_png(tmp_path_factory.mktemp("bomb") / "bomb.png")


# --- extensions, hashing ------------------------------------------------------------------------


def test_image_extensions_are_lower_case_and_cover_the_common_formats():
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)
    assert {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff"} <= IMAGE_EXTENSIONS
    assert (".webp" in IMAGE_EXTENSIONS) == WEBP
    assert ".heic" not in IMAGE_EXTENSIONS and ".heic" in images.CANDIDATE_EXTENSIONS


def test_sha256_file_matches_hashlib(tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)  # several chunks
    (tmp_path / "f.bin").write_bytes(data)
    assert sha256_file(tmp_path / "f.bin") == hashlib.sha256(data).hexdigest()
    assert sha256_file(tmp_path / "f.bin", chunk_size=1000) == hashlib.sha256(data).hexdigest()


def test_truncated_images_are_not_loaded_globally():
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


# --- files that are not usable images -----------------------------------------------------------


def test_zero_byte_file_is_rejected_as_empty(tmp_path):
    (tmp_path / "empty.jpg").touch()
    assert reason_of(tmp_path / "empty.jpg") == "empty file"


def test_text_file_named_jpg_is_rejected(tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not a photo\n")
    assert reason_of(tmp_path / "notes.jpg").startswith("not an image (unidentified format)")


def test_unsupported_heic_format_says_what_to_do(tmp_path):
    # an ISO-BMFF 'ftypheic' header, as iPhones write, that Pillow (without pillow-heif) cannot read
    (tmp_path / "IMG_0001.HEIC").write_bytes(
        b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)
    )
    reason = reason_of(tmp_path / "IMG_0001.HEIC")
    assert reason.startswith("not an image (unidentified format)")
    assert "HEIC" in reason and "pillow-heif" in reason and "JPEG" in reason


def test_heic_content_behind_a_jpg_extension_is_recognised(tmp_path):
    (tmp_path / "IMG_0002.jpg").write_bytes(
        b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)
    )
    assert "pillow-heif" in reason_of(tmp_path / "IMG_0002.jpg")


@pytest.mark.parametrize(
    "content, says",
    [
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n", "PostScript/EPS"),
        (b"%PDF-1.7\n", "PDF document"),
        (b"8BPS\x00\x01" + bytes(40), "Photoshop PSD"),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "SVG"),
        (b"\x00\x00\x00\x14ftypqt  \x00\x00\x00\x00qt  ", "video"),
    ],
)
def test_other_formats_behind_an_image_extension_are_named_not_decoded(tmp_path, content, says):
    # EPS in particular must never reach Pillow's EPS plugin, which runs Ghostscript
    (tmp_path / "x.jpg").write_bytes(content)
    reason = reason_of(tmp_path / "x.jpg")
    assert reason.startswith("not an image (unidentified format)") and says in reason


@pytest.mark.parametrize("fmt, ext", [("JPEG", "jpg"), ("PNG", "png"), ("GIF", "gif")])
def test_truncated_image_is_rejected(tmp_path, fmt, ext):
    buf = io.BytesIO()
    noise(48, 48).save(buf, fmt)
    data = buf.getvalue()
    path = tmp_path / f"cut.{ext}"
    path.write_bytes(data[: len(data) // 2])
    assert reason_of(path).startswith("corrupt or truncated image")


def test_png_with_corrupt_data_is_rejected(tmp_path):
    buf = io.BytesIO()
    noise(48, 48).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    third = len(data) // 3
    data[third : 2 * third] = (
        np.random.default_rng(1).integers(0, 256, third, dtype=np.uint8).tobytes()
    )
    (tmp_path / "bad.png").write_bytes(bytes(data))
    assert reason_of(tmp_path / "bad.png").startswith("corrupt or truncated image")


def test_jpeg_cut_inside_its_header_is_rejected(tmp_path):
    buf = io.BytesIO()
    noise().save(buf, "JPEG")
    (tmp_path / "head.jpg").write_bytes(buf.getvalue()[:40])
    assert reason_of(tmp_path / "head.jpg").startswith(("not an image", "corrupt"))


def test_png_content_with_jpg_extension_is_decoded_by_content(tmp_path):
    path = save(
        Image.new("RGB", (20, 20), (10, 200, 30)), tmp_path / "really_png.jpg", format="PNG"
    )
    assert close(load_rgb(path, SIZE)[5, 5], (10, 200, 30), 0)


def test_unreadable_directory_named_like_an_image_is_rejected(tmp_path):
    (tmp_path / "folder.jpg").mkdir()
    assert reason_of(tmp_path / "folder.jpg").startswith("cannot read file")


# --- size limits ----------------------------------------------------------------------------------


def test_image_over_max_pixels_is_refused_from_the_header(tmp_path, monkeypatch):
    path = save(Image.new("L", (1000, 1000)), tmp_path / "big.png")
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(
        ImageFile.ImageFile, "load", lambda self: loads.append(1) or real_load(self)
    )
    reason = reason_of(path, max_pixels=500_000)
    assert reason.startswith("image too large: 1000x1000 = 1000000 pixels > data.max_pixels=500000")
    assert loads == []  # refused before any pixel was decoded
    assert load_rgb(path, SIZE, max_pixels=1_000_000).shape == (SIZE, SIZE, 3)  # limit inclusive
    assert loads


def test_decompression_bomb_is_refused_without_decoding(bomb, monkeypatch):
    path = bomb
    assert path.stat().st_size < 200_000  # tiny file, 400 megapixels
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(
        ImageFile.ImageFile, "load", lambda self: loads.append(1) or real_load(self)
    )
    # Beyond Pillow's own limit (2 x MAX_IMAGE_PIXELS): its DecompressionBombError becomes a rejection.
    assert reason_of(path).startswith("image too large")
    assert loads == []


def test_decompression_bomb_refused_by_max_pixels_keeps_memory_low(bomb):
    """With Pillow's own guard off, data.max_pixels alone stops the bomb; peak memory stays low.

    Run in a fresh process so that ru_maxrss (the peak) measures only this load; decoding would
    need ~400 MB (mode '1' is stored as one byte per pixel).
    """
    path = bomb
    code = f"""
import json, resource, sys
from PIL import Image
Image.MAX_IMAGE_PIXELS = None
from pipeline.lib.data.images import load_rgb, RejectedImage
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_rgb({str(path)!r}, 32, max_pixels=60_000_000)
    reason = None
except RejectedImage as exc:
    reason = exc.reason
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"reason": reason, "delta_kb": after - before}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["reason"].startswith(
        "image too large: 20000x20000 = 400000000 pixels > data.max_pixels=60000000"
    )
    assert result["delta_kb"] < 50_000  # < 50 MB, decoding would take ~400 MB


# --- colour modes -------------------------------------------------------------------------------


def test_rgb_output_shape_and_type(tmp_path):
    path = save(noise(20, 40), tmp_path / "a.png")
    for policy in ("stretch", "pad", "crop"):
        out = load_rgb(path, SIZE, resize=policy)
        assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8 and out.flags.c_contiguous


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = Image.fromarray(np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1)))
    out = load_rgb(save(gray, tmp_path / "g.png"), SIZE)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    assert out[..., 0].min() < 20 and out[..., 0].max() > 230


def test_one_bit_image(tmp_path):
    bits = Image.new("1", (16, 16), 0)
    bits.paste(1, (0, 0, 16, 8))  # top half white
    out = load_rgb(save(bits, tmp_path / "b.png"), SIZE)
    assert close(out[2, 16], (255, 255, 255), 0) and close(out[29, 16], (0, 0, 0), 0)


def test_rgba_transparent_pixels_become_white_not_black(tmp_path):
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # transparent black
    rgba.paste((200, 0, 0, 255), (0, 0, 16, 8))  # opaque red top half
    out = load_rgb(save(rgba, tmp_path / "t.png"), SIZE)
    assert close(out[28, 16], (255, 255, 255), 0)  # a naive convert("RGB") gives (0, 0, 0)
    assert close(out[2, 16], (200, 0, 0), 0)


def test_rgba_half_transparent_blends_with_white(tmp_path):
    out = load_rgb(save(Image.new("RGBA", (8, 8), (0, 0, 0, 128)), tmp_path / "h.png"), SIZE)
    assert close(out[4, 4], (127, 127, 127), 2)


def test_palette_with_transparency(tmp_path):
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))  # 0: black, 1: blue
    pal.paste(1, (0, 0, 16, 8))
    path = tmp_path / "p.png"
    pal.save(path, transparency=0)  # index 0 (black) is transparent
    assert opened(path, "mode") == "P"
    out = load_rgb(path, SIZE)
    assert close(out[28, 16], (255, 255, 255), 0) and close(out[2, 16], (0, 0, 255), 0)


def test_palette_gif_with_transparency(tmp_path):
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    pal.paste(1, (0, 0, 16, 8))
    path = tmp_path / "p.gif"
    pal.save(path, transparency=0)
    out = load_rgb(path, SIZE)
    assert close(out[28, 16], (255, 255, 255), 0) and close(out[2, 16], (0, 255, 0), 0)


def test_la_image(tmp_path):
    la = Image.new("LA", (16, 16), (0, 0))  # transparent
    la.paste((100, 255), (0, 0, 16, 8))
    out = load_rgb(save(la, tmp_path / "la.png"), SIZE)
    assert close(out[28, 16], (255, 255, 255), 0) and close(out[2, 16], (100, 100, 100), 0)


def test_cmyk_jpeg(tmp_path):
    path = save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "c.jpg", quality=95)
    assert opened(path, "mode") == "CMYK"
    assert close(load_rgb(path, SIZE)[16, 16], (255, 0, 0), 8)


@pytest.mark.parametrize("value, expected", [(65535, 255), (32768, 128), (257, 1), (0, 0)])
def test_16_bit_png_is_scaled_not_clipped(tmp_path, value, expected):
    path = save(Image.fromarray(np.full((16, 16), value, np.uint16)), tmp_path / "d.png")
    assert opened(path, "mode").startswith("I;16")
    out = load_rgb(path, SIZE)
    assert close(out[8, 8], (expected,) * 3, 1)  # clipping would give 255 for 32768 and 257


def test_float_image_in_unit_range(tmp_path):
    path = save(Image.fromarray(np.full((16, 16), 0.5, np.float32)), tmp_path / "f.tif")
    assert opened(path, "mode") == "F"
    assert close(load_rgb(path, SIZE)[8, 8], (128, 128, 128), 1)


def test_animated_gif_uses_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert opened(path, "n_frames") == 3
    assert close(load_rgb(path, SIZE)[8, 8], (255, 0, 0), 2)


@pytest.mark.skipif(not WEBP, reason="this Pillow has no WebP support")
def test_webp_with_alpha(tmp_path):
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    rgba.paste((0, 0, 200, 255), (0, 0, 16, 8))
    out = load_rgb(save(rgba, tmp_path / "a.webp", lossless=True), SIZE)
    assert close(out[28, 16], (255, 255, 255), 0) and close(out[2, 16], (0, 0, 200), 0)


@pytest.mark.skipif(not WEBP, reason="this Pillow has no WebP support")
def test_animated_webp_uses_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    path = tmp_path / "anim.webp"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, lossless=True)
    assert opened(path, "n_frames") == 2
    assert close(load_rgb(path, SIZE)[8, 8], (255, 0, 0), 2)


# --- orientation, resize policies, draft --------------------------------------------------------


def left_red_right_blue(w: int = 40, h: int = 20) -> Image.Image:
    im = Image.new("RGB", (w, h), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, w // 2, h))
    return im


@pytest.mark.parametrize(
    "orientation, top, bottom",
    [
        (1, None, None),  # upright: red left, blue right
        (6, (255, 0, 0), (0, 0, 255)),  # rotate 90 clockwise to display: the left side goes on top
        (8, (0, 0, 255), (255, 0, 0)),  # rotate 90 counter-clockwise: the right side goes on top
    ],
)
def test_exif_orientation_is_applied(tmp_path, orientation, top, bottom):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(left_red_right_blue(), tmp_path / f"o{orientation}.jpg", exif=exif, quality=95)
    out = load_rgb(path, SIZE)
    if orientation == 1:
        assert close(out[16, 3], (255, 0, 0), 40) and close(out[16, 28], (0, 0, 255), 40)
    else:
        assert close(out[3, 16], top, 40) and close(out[28, 16], bottom, 40)


def thirds(w: int = 60, h: int = 20) -> Image.Image:
    im = Image.new("RGB", (w, h), (0, 255, 0))
    im.paste((255, 0, 0), (0, 0, w // 3, h))
    im.paste((0, 0, 255), (2 * w // 3, 0, w, h))
    return im


def test_resize_stretch_crop_and_pad(tmp_path):
    path = save(thirds(), tmp_path / "wide.png")
    stretch = load_rgb(path, SIZE, resize="stretch")
    assert close(stretch[16, 2], (255, 0, 0), 3) and close(stretch[16, 29], (0, 0, 255), 3)
    crop = load_rgb(path, SIZE, resize="crop")  # the centre square is all green
    assert close(crop[16, 2], (0, 255, 0), 3) and close(crop[16, 29], (0, 255, 0), 3)
    assert close(crop[0, 16], (0, 255, 0), 3) and close(crop[31, 16], (0, 255, 0), 3)
    pad = load_rgb(path, SIZE, resize="pad")  # 60x20 -> 32x11, bars above and below
    assert close(pad[0, 16], images.PAD_COLOR, 0) and close(pad[31, 16], images.PAD_COLOR, 0)
    assert close(pad[16, 1], (255, 0, 0), 10) and close(pad[16, 16], (0, 255, 0), 10)
    with pytest.raises(ValueError, match="resize"):
        load_rgb(path, SIZE, resize="squash")


def test_tall_image_pad_has_bars_left_and_right(tmp_path):
    path = save(Image.new("RGB", (10, 40), (255, 0, 0)), tmp_path / "tall.png")
    pad = load_rgb(path, SIZE, resize="pad")
    assert close(pad[16, 0], images.PAD_COLOR, 0) and close(pad[16, 31], images.PAD_COLOR, 0)
    assert close(pad[16, 16], (255, 0, 0), 3)


def test_large_jpeg_is_decoded_at_reduced_scale_keeping_quality(tmp_path, monkeypatch):
    big = noise(768, 1024, seed=3).resize((1024, 768), Image.Resampling.BILINEAR)
    big = big.resize((128, 96), Image.Resampling.BOX).resize((1024, 768), Image.Resampling.BICUBIC)
    path = save(big, tmp_path / "big.jpg", quality=95)
    seen = []
    real = images._apply_orientation
    monkeypatch.setattr(images, "_apply_orientation", lambda im: seen.append(im.size) or real(im))
    out = load_rgb(path, SIZE)
    assert seen == [(128, 96)]  # 1/8 scale: both sides still >= 2 x 32
    with Image.open(path) as im:
        reference = np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.Resampling.LANCZOS))
    assert np.abs(out.astype(int) - reference.astype(int)).mean() < 4
    seen.clear()
    load_rgb(path, 224)  # both sides must stay >= 448: 1/2 scale (512, 384) is too small, so 1/1
    assert seen == [(1024, 768)]
    seen.clear()
    load_rgb(path, 160)  # >= 320: 1/2 scale
    assert seen == [(512, 384)]
