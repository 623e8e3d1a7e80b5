"""Decoding one image file into a square sRGB uint8 array (`load_rgb`), or saying why not
(`RejectedImage`). Thread-safe: Pillow's global settings are left alone (registering the HEIF
opener adds a format only)."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError, features

from pipeline.lib.config.schema import MAX_PIXELS

# HEIC/HEIF (the iPhone default) through pillow-heif; a served model's slim env may lack it
with contextlib.suppress(ImportError):
    __import__("pillow_heif").register_heif_opener()

RESIZE_POLICIES = ("stretch", "pad", "crop")
#: The letterbox colour of `resize="pad"` (mid-grey: ~0 after [-1, 1] scaling).
PAD_COLOR = (128, 128, 128)
#: Transparent pixels are composited onto this colour.
BACKGROUND = (255, 255, 255)
#: JPEGs are decoded at 1/2, 1/4 or 1/8 scale while both sides stay >= this times the target.
DRAFT_FACTOR = 2
REDUCING_GAP = 3.0  # Image.resize: box-reduce first, LANCZOS over the last factor of 3

#: Embedded colour profiles to sRGB, relative colorimetric: in-gamut colours kept, others clipped
#: (for phones' and cameras' matrix profiles, P3, Adobe RGB, ProPhoto, the same as perceptual).
RENDERING_INTENT = ImageCms.Intent.RELATIVE_COLORIMETRIC
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
#: Image mode -> (the profile colour space it needs, the mode it is converted to).
_PROFILE_MODES = {"RGB": ("RGB", "RGB"), "RGBA": ("RGB", "RGBA"), "CMYK": ("CMYK", "RGB")}
_PROFILE_MODES["L"] = ("GRAY", "RGB")

# JPEG (also camera MPO files named .jpg), PNG, BMP, GIF, TIFF, PNM, TGA; then the formats only
# some Pillow builds decode: name -> (decoded here, extensions); HEIF by pillow-heif's opener
_ALWAYS = ".jpg .jpeg .jpe .jfif .png .apng .bmp .dib .gif .tif .tiff .pbm .pgm .ppm .pnm .tga"
_OPTIONAL = {
    "WebP": (features.check("webp"), ".webp"),
    "AVIF": (features.check("avif"), ".avif .avifs"),
    "JPEG 2000": (features.check("jpg_2000"), ".jp2 .j2k .jpx .jpf .j2c"),
    "HEIF": ("HEIF" in Image.OPEN, ".heic .heif .hif"),
}
_SUPPORTED = [exts for decoded, exts in _OPTIONAL.values() if decoded]
#: Lower-case extensions that are decoded (WebP/AVIF/JPEG 2000/HEIF when supported here).
IMAGE_EXTENSIONS: frozenset[str] = frozenset(" ".join([_ALWAYS, *_SUPPORTED]).split())

_SVG_HINT = "vector image (SVG), which is not decoded: export it to PNG first"
_RAW = ".cr2 .cr3 .crw .nef .nrw .arw .srf .sr2 .dng .orf .rw2 .raf .pef .srw .x3f .3fr .erf .kdc"
_RAW += " .mrw .raw"
_RAW_HINT = "camera RAW file, which is not decoded: export it to JPEG or PNG first"
#: Image extensions this Pillow cannot decode -> a hint; such files are rejected, not skipped.
UNSUPPORTED_IMAGE_EXTENSIONS: dict[str, str] = {
    **dict.fromkeys((".svg", ".svgz"), _SVG_HINT),
    ".jxl": "JPEG XL image, which this Pillow cannot decode: convert it to JPEG or PNG first",
    **dict.fromkeys(_RAW.split(), _RAW_HINT),
    **{
        ext: f"{what} image, which this Pillow build cannot decode: convert it to JPEG or PNG, "
        f"or install {'pillow-heif' if what == 'HEIF' else f'a Pillow built with {what} support'}"
        for what, (decoded, exts) in _OPTIONAL.items()
        if not decoded
        for ext in exts.split()
    },
}
#: Everything discovery treats as an image file (decodable or not).
CANDIDATE_EXTENSIONS: frozenset[str] = IMAGE_EXTENSIONS | frozenset(UNSUPPORTED_IMAGE_EXTENSIONS)

# Only plain raster decoders: a misnamed file never reaches EPS (Ghostscript), PSD or ICO.
Image.init()
_DECODERS = "JPEG MPO PNG GIF BMP DIB TIFF WEBP PPM TGA AVIF JPEG2000 HEIF"
DECODE_FORMATS: tuple[str, ...] = tuple(f for f in _DECODERS.split() if f in Image.OPEN)
_HEIF_BRANDS = set(b"heic heix hevc hevx heim heis hevm hevs mif1 msf1".split())
_VIDEO_BRANDS = {b"qt  ", b"isom", b"iso2", b"mp41", b"mp42", b"avc1", b"M4V ", b"3gp4", b"3gp5"}
#: Exceptions Pillow's decoders raise on damaged data (besides OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, LookupError)
_DECODE_ERRORS += (TypeError, AttributeError, ArithmeticError, RuntimeError)


class RejectedImage(Exception):
    """A file that cannot be used as a training image; `reason` says why in a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def load_rgb(
    path: str | os.PathLike[str],
    size: int,
    resize: str = "stretch",
    max_pixels: int = MAX_PIXELS,
    notes: list[str] | None = None,
    data: bytes | None = None,
) -> np.ndarray:
    """Decode `path` (EXIF-rotated, first frame, embedded colour profile converted to sRGB, any
    mode to RGB, transparency on white) into uint8 (size, size, 3). `resize`: `stretch`, `pad`
    (letterbox on `PAD_COLOR`) or `crop` (centre square). A profile that cannot be used is
    ignored, saying so in `notes`. `data`: the file's bytes, if already read. RejectedImage: not
    a usable image, or over `max_pixels` (checked from the header); ValueError: bad `resize`."""
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_POLICIES)}, not {resize!r}")
    with _open(Path(path), data) as image:
        width, height = image.size
        if width < 1 or height < 1:
            raise RejectedImage(f"invalid image size {width}x{height}")
        if width * height > max_pixels:
            raise RejectedImage(
                f"image too large: {width}x{height} = {width * height} pixels > "
                f"data.max_pixels={max_pixels} (downscale it, or raise data.max_pixels)"
            )
        try:
            return _decode(image, size, resize, [] if notes is None else notes)
        except MemoryError:
            raise RejectedImage(
                f"out of memory decoding a {width}x{height} image (lower data.max_pixels)"
            ) from None
        except Image.DecompressionBombError as exc:  # e.g. a later frame larger than frame 0
            raise RejectedImage(f"image too large: {exc}") from None
        except _DECODE_ERRORS as exc:
            raise RejectedImage(
                f"corrupt or truncated image ({type(exc).__name__}: {exc})"
            ) from None


def _open(path: Path, data: bytes | None = None) -> Image.Image:
    """`path` (or its bytes `data`) opened by one of `DECODE_FORMATS`, else RejectedImage."""
    try:
        if (path.stat().st_size if data is None else len(data)) == 0:
            raise RejectedImage("empty file")
        return Image.open(path if data is None else io.BytesIO(data), formats=DECODE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise RejectedImage(f"image too large: {exc} (Pillow's bomb guard): downscale it") from None
    except UnidentifiedImageError:
        unknown = f"the content is none of {', '.join(DECODE_FORMATS)}, whatever the extension "
        unknown += "says; re-export it as JPEG or PNG, or remove it"
        hint = _sniff(path) or UNSUPPORTED_IMAGE_EXTENSIONS.get(path.suffix.lower()) or unknown
        raise RejectedImage(f"not an image (unidentified format): {hint}") from None
    except OSError as exc:
        if exc.errno is not None:  # the operating system could not read it
            raise RejectedImage(f"cannot read file ({exc.strerror or exc})") from None
        raise RejectedImage(f"corrupt or truncated image ({exc})") from None
    except _DECODE_ERRORS as exc:  # a damaged header can raise almost anything
        raise RejectedImage(f"corrupt image header ({type(exc).__name__}: {exc})") from None


def _sniff(path: Path) -> str | None:
    """What an undecodable file really is, from its first bytes (extensions lie)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(256)
    except OSError:
        return None
    brand = head[8:12] if head[4:8] == b"ftyp" else b""
    if brand in _HEIF_BRANDS | {b"avif", b"avis"}:
        ext = ".avif" if brand.startswith(b"avi") else ".heic"
        return UNSUPPORTED_IMAGE_EXTENSIONS.get(ext, f"damaged {ext[1:].upper()} image")
    if brand in _VIDEO_BRANDS:
        return "a video (MP4/MOV, e.g. a Live Photo clip), not a still image: remove it"
    if head.startswith(b"%PDF"):
        return "a PDF document, not an image: export the page as PNG or remove it"
    if head.startswith(b"8BPS"):
        return "a Photoshop PSD file: export it as JPEG or PNG"
    if head.startswith((b"%!PS", b"\xc5\xd0\xd3\xc6")):
        return "a PostScript/EPS file, which is not decoded: export it as PNG"
    return _SVG_HINT if b"<svg" in head else None


def _decode(image: Image.Image, size: int, resize: str, notes: list[str]) -> np.ndarray:
    if image.format in ("JPEG", "MPO"):  # (an animation's first frame is current after open)
        image.draft(None, (size * DRAFT_FACTOR, size * DRAFT_FACTOR))
    image.load()  # raises on truncated/corrupt data (LOAD_TRUNCATED_IMAGES stays off)
    upright = _apply_orientation(image)
    try:  # the embedded colour profile (if any) to sRGB
        transform = _profile_transform(upright.info.get("icc_profile") or b"", upright.mode)
        upright = ImageCms.applyTransform(upright, transform) if transform else upright
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as exc:
        notes.append(f"colour profile ignored ({exc})")
    return np.ascontiguousarray(_resize(_to_rgb(upright), size, resize), dtype=np.uint8)


def _apply_orientation(image: Image.Image) -> Image.Image:
    """Upright as the EXIF orientation says; a malformed EXIF block leaves it as stored."""
    with contextlib.suppress(Exception):
        if image.getexif().get(0x0112, 1) in (2, 3, 4, 5, 6, 7, 8):
            return ImageOps.exif_transpose(image)
    return image


@functools.lru_cache(maxsize=16)
def _profile_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """The transform to sRGB, or None where nothing changes: no profile, an sRGB one (those
    files keep their bytes), or a mode rarely tagged (P, LA, I;16: decoded as before)."""
    if not icc or mode not in _PROFILE_MODES:
        return None
    space, out_mode = _PROFILE_MODES[mode]
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    if (found := profile.profile.xcolor_space.strip()) != space:
        raise ValueError(f"a {found} profile on a {mode} image")
    transform = ImageCms.buildTransform(profile, _SRGB, mode, out_mode, RENDERING_INTENT)
    if space == "RGB":  # a grid of colours that come back within one level: an sRGB profile
        grid = np.stack(np.meshgrid(*[np.arange(0, 256, 15, dtype=np.uint8)] * 3), -1)
        probe = Image.fromarray(grid.reshape(-1, 18, 3)).convert(mode)
        back = np.asarray(ImageCms.applyTransform(probe, transform), dtype=np.int16)
        if np.abs(back - np.asarray(probe, dtype=np.int16)).max() <= 1:
            return None
    return transform


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I", "F") or mode.startswith("I;16"):
        return Image.fromarray(_scale_to_uint8(np.asarray(image), mode)).convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
        "transparency" in image.info and mode in ("P", "L", "RGB", "1")
    ):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")  # L, P, 1, CMYK, YCbCr, HSV, ...
    except ValueError as exc:
        raise RejectedImage(f"unsupported colour mode {mode} ({exc})") from None


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit, 32-bit integer and float single-channel data to 8 bits, scaled, not clipped."""
    data = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and 255 < hi <= 65535):
        data = data / 257.0  # 16-bit: 65535 -> 255, 32768 -> 127.5
    elif mode == "I" and not (lo >= 0 and hi <= 255):  # (8-bit data in 32-bit integers: as is)
        data = (data - lo) * (255.0 / (hi - lo))
    elif mode == "F" and lo >= 0 and hi <= 1.0:
        data = data * 255.0
    elif mode == "F" and not (lo >= 0 and hi <= 255):
        data = (data - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(data)
    return np.clip(np.rint(data), 0, 255).astype(np.uint8)


def _resize(image: Image.Image, size: int, policy: str) -> Image.Image:
    width, height = image.size
    box = None
    if policy == "crop":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        box = (left, top, left + side, top + side)
    elif policy == "pad":  # fit the long side, centre on a neutral background
        scale = size / max(width, height)
        inner = (max(1, min(size, round(width * scale))), max(1, min(size, round(height * scale))))
        canvas = Image.new("RGB", (size, size), PAD_COLOR)
        canvas.paste(_resample(image, inner), ((size - inner[0]) // 2, (size - inner[1]) // 2))
        return canvas
    return _resample(image, (size, size), box)


def _resample(image: Image.Image, target: tuple[int, int], box=None) -> Image.Image:
    if image.size == target and box is None:
        return image
    return image.resize(target, Image.Resampling.LANCZOS, box=box, reducing_gap=REDUCING_GAP)
