"""`pipeline.lib.data.images`: decoding one file, every failure mode and colour mode, built in tmp_path."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageFile, features

from pipeline.lib.data import images
from pipeline.lib.data.images import IMAGE_EXTENSIONS, RejectedImage, load_rgb

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
    assert {".heic", ".heif", ".hif"} <= IMAGE_EXTENSIONS  # pillow-heif is a dependency
    assert ".svg" not in IMAGE_EXTENSIONS and ".svg" in images.CANDIDATE_EXTENSIONS


def test_truncated_images_are_not_loaded_globally():
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


# --- files that are not usable images -----------------------------------------------------------


def test_zero_byte_file_is_rejected_as_empty(tmp_path):
    (tmp_path / "empty.jpg").touch()
    assert reason_of(tmp_path / "empty.jpg") == "empty file"


def test_text_file_named_jpg_is_rejected(tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not a photo\n")
    assert reason_of(tmp_path / "notes.jpg").startswith("not an image (unidentified format)")


def test_damaged_heic_is_rejected_not_crashing(tmp_path):
    # an ISO-BMFF 'ftypheic' header, as iPhones write, with nothing behind it
    (tmp_path / "IMG_0001.HEIC").write_bytes(
        b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)
    )
    reason = reason_of(tmp_path / "IMG_0001.HEIC")
    assert reason.startswith(("corrupt", "not an image")), reason


def test_without_pillow_heif_a_heic_is_rejected_with_what_to_do(tmp_path):
    # a served model's environment may lack the plugin: HEIC files are then named, not decoded
    (tmp_path / "IMG_0002.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    code = f"""
import sys; sys.modules["pillow_heif"] = None
from pipeline.lib.data.images import IMAGE_EXTENSIONS, RejectedImage, load_rgb
assert ".heic" not in IMAGE_EXTENSIONS
try:
    load_rgb({str(tmp_path / "IMG_0002.heic")!r}, 32)
except RejectedImage as exc:
    print(exc)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "HEIF image" in out.stdout and "install pillow-heif" in out.stdout


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


def test_max_pixels_above_pillows_own_limit_is_refused_up_front():
    """Pillow's Image.open refuses > 2 x MAX_IMAGE_PIXELS before our check: a larger
    data.max_pixels could not take effect, so validation refuses it, naming the key."""
    from pipeline.lib.config.schema import PILLOW_MAX_PIXELS, ConfigError, validate
    from tests.conftest import compose

    limit = PILLOW_MAX_PIXELS
    assert limit == 2 * Image.MAX_IMAGE_PIXELS == 178_956_970  # the schema's bound, literally
    assert validate(compose([f"data.max_pixels={limit}"])).data.max_pixels == limit
    with pytest.raises(ConfigError, match=r"data\.max_pixels=178956971: must be in \[1, 1789"):
        validate(compose([f"data.max_pixels={limit + 1}"]))


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


# --- colour profiles (ICC) and HEIC ---------------------------------------------------------------

#: Columns of a saturated red, green and blue: colours that tell classes apart.
COLOURS = np.zeros((SIZE, SIZE, 3), np.uint8)
COLOURS[:, :11], COLOURS[:, 11:22], COLOURS[:, 22:] = (230, 20, 20), (20, 200, 40), (30, 40, 220)
D50 = (0.3457, 0.3585)


def icc_profile(primaries, white, gamma: float, name: str) -> bytes:
    """A v2 matrix/TRC display profile (what phones and cameras embed) written byte by byte:
    `primaries` and `white` as CIE xy, one gamma for the three channels."""

    def xyz(x: float, y: float) -> np.ndarray:
        return np.array([x / y, 1.0, (1 - x - y) / y])

    matrix = np.stack([xyz(*p) for p in primaries], axis=1)
    matrix = matrix * np.linalg.solve(matrix, xyz(*white))  # RGB (1, 1, 1) -> the white point
    bradford = np.array(
        [[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]]
    )
    adapt = (
        np.linalg.inv(bradford)
        @ np.diag((bradford @ xyz(*D50)) / (bradford @ xyz(*white)))
        @ bradford
    )
    colorants = adapt @ matrix  # ICC colorants are relative to D50

    def xyz_tag(v) -> bytes:
        return b"XYZ \0\0\0\0" + b"".join(
            round(c * 65536).to_bytes(4, "big", signed=True) for c in v
        )

    text = name.encode("ascii")
    desc = b"desc\0\0\0\0" + (len(text) + 1).to_bytes(4, "big") + text + b"\0" + bytes(8 + 3 + 67)
    curve = (
        b"curv\0\0\0\0" + (1).to_bytes(4, "big") + round(gamma * 256).to_bytes(2, "big") + b"\0\0"
    )
    tags = [(b"desc", desc), (b"cprt", b"text\0\0\0\0none\0"), (b"wtpt", xyz_tag(xyz(*D50)))]
    tags += [(k + b"XYZ", xyz_tag(colorants[:, i])) for i, k in enumerate((b"r", b"g", b"b"))]
    tags += [(k + b"TRC", curve) for k in (b"r", b"g", b"b")]
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for sig, body in tags:
        body += bytes(-len(body) % 4)
        table += sig + (offset + len(data)).to_bytes(4, "big") + len(body).to_bytes(4, "big")
        data += body
    size = offset + len(data)
    header = (
        size.to_bytes(4, "big") + b"none" + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ " + bytes(12)
    )
    header += b"acsp" + bytes(24) + bytes(4) + xyz_tag(xyz(*D50))[8:] + bytes(48)
    return header + len(tags).to_bytes(4, "big") + table + data


PROPHOTO = icc_profile([(0.7347, 0.2653), (0.1596, 0.8404), (0.0366, 0.0001)], D50, 1.8, "ProPhoto")
P3 = icc_profile([(0.680, 0.320), (0.265, 0.690), (0.150, 0.060)], (0.3127, 0.3290), 2.2, "P3")
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def tagged(pixels: np.ndarray, icc: bytes, path: Path, **kwargs) -> Path:
    """`pixels` (sRGB) converted by ImageCms into the profile `icc`, saved with it embedded."""
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    image = ImageCms.profileToProfile(Image.fromarray(pixels), SRGB, profile, outputMode="RGB")
    return save(image, path, icc_profile=icc, **kwargs)


def srgb_by_imagecms(path: Path) -> np.ndarray:
    """The reference: ImageCms's own conversion of the file from its profile to sRGB."""
    with Image.open(path) as im:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(im.info["icc_profile"]))
        intent = ImageCms.Intent.RELATIVE_COLORIMETRIC
        return np.asarray(ImageCms.profileToProfile(im, profile, SRGB, intent, outputMode="RGB"))


@pytest.mark.parametrize("icc", [PROPHOTO, P3], ids=["prophoto", "display-p3"])
def test_an_embedded_colour_profile_is_converted_to_srgb_as_imagecms_does(tmp_path, icc):
    path = tagged(COLOURS, icc, tmp_path / "c.png")
    stored = np.asarray(Image.open(path).convert("RGB"), int)
    assert np.abs(stored - COLOURS).mean() > 10  # the file's own numbers are far from sRGB
    notes: list[str] = []
    assert np.array_equal(load_rgb(path, SIZE, notes=notes), srgb_by_imagecms(path)) and not notes
    out = load_rgb(path, SIZE)
    assert np.abs(out.astype(int) - COLOURS).mean() < 1.5  # what a colour-managed viewer shows
    assert close(out[16, 5], (230, 20, 20), 3)
    jpeg = tagged(COLOURS, icc, tmp_path / "c.jpg", quality=95, subsampling=0)  # the JPEG path
    assert np.array_equal(load_rgb(jpeg, SIZE), srgb_by_imagecms(jpeg))
    # (JPEG rounding in a wide-gamut space moves a channel by up to ~8 levels in sRGB)
    assert close(load_rgb(jpeg, SIZE)[16, 5], (230, 20, 20), 10)


def test_colour_conversion_follows_exif_rotation_and_keeps_alpha(tmp_path):
    rgba = np.dstack([COLOURS, np.full((SIZE, SIZE), 255, np.uint8)])
    rgba[:, 22:, 3] = 0  # the blue column transparent
    profile = ImageCms.ImageCmsProfile(io.BytesIO(PROPHOTO))
    image = ImageCms.profileToProfile(Image.fromarray(rgba), SRGB, profile, outputMode="RGBA")
    out = load_rgb(save(image, tmp_path / "a.png", icc_profile=PROPHOTO), SIZE)
    assert close(out[16, 5], (230, 20, 20), 3) and close(out[16, 28], (255, 255, 255), 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    path = tagged(COLOURS, PROPHOTO, tmp_path / "r.png", exif=exif)
    out = load_rgb(path, SIZE)  # the red column is now the top row, the blue one the bottom row
    assert close(out[5, 16], (230, 20, 20), 3) and close(out[28, 16], (30, 40, 220), 3)


def test_photos_without_a_profile_or_with_an_srgb_one_keep_their_exact_bytes(tmp_path):
    plain = load_rgb(save(Image.fromarray(COLOURS), tmp_path / "p.png"), SIZE)
    srgb = SRGB.tobytes()
    tagged_srgb = load_rgb(
        save(Image.fromarray(COLOURS), tmp_path / "s.png", icc_profile=srgb), SIZE
    )
    assert np.array_equal(plain, COLOURS) and np.array_equal(tagged_srgb, COLOURS)


@pytest.mark.parametrize(
    "icc, says",
    [(b"not a colour profile at all", "colour profile ignored"), (PROPHOTO[:200], "ignored")],
)
def test_a_broken_profile_decodes_as_is_with_a_note(tmp_path, icc, says):
    path = save(Image.fromarray(COLOURS), tmp_path / "b.png", icc_profile=icc)
    notes: list[str] = []
    assert np.array_equal(load_rgb(path, SIZE, notes=notes), COLOURS)
    assert len(notes) == 1 and says in notes[0]
    assert np.array_equal(load_rgb(path, SIZE), COLOURS)  # no notes list: still decoded


def test_a_profile_of_the_wrong_colour_space_is_ignored_with_a_note(tmp_path):
    grey = Image.fromarray(COLOURS).convert("L")
    notes: list[str] = []
    out = load_rgb(save(grey, tmp_path / "g.png", icc_profile=PROPHOTO), SIZE, notes=notes)
    assert np.array_equal(out[..., 0], np.asarray(grey)) and "RGB profile on a L image" in notes[0]


def test_heic_photo_decodes_close_to_its_source_pixels(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")  # a declared dependency: present in CI
    smooth = np.zeros((64, 96, 3), np.uint8)  # HEVC is lossy: smooth areas, not noise
    smooth[:, :32], smooth[:, 32:64], smooth[:, 64:] = (230, 20, 20), (20, 200, 40), (30, 40, 220)
    heif = pillow_heif.from_pillow(Image.fromarray(smooth))
    heif.save(tmp_path / "IMG_0001.HEIC", quality=95)
    assert opened(tmp_path / "IMG_0001.HEIC", "format") == "HEIF"
    out = load_rgb(tmp_path / "IMG_0001.HEIC", 48, resize="stretch")
    source = np.asarray(Image.fromarray(smooth).resize((48, 48), Image.Resampling.LANCZOS), int)
    # tolerance: HEVC 4:2:0 chroma at quality 95 blurs colour edges; the column centres match
    assert np.abs(out.astype(int) - source).mean() < 6
    assert close(out[24, 8], (230, 20, 20), 8) and close(out[24, 40], (30, 40, 220), 8)
    (tmp_path / "IMG_0001.jpg").write_bytes((tmp_path / "IMG_0001.HEIC").read_bytes())
    assert np.array_equal(load_rgb(tmp_path / "IMG_0001.jpg", 48), out)  # by content, not name
