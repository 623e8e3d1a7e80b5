"""The toy-truck photo that `synthetic` writes: a side view of a plastic toy truck (its load
tells the class) on a light plain backdrop, drawn at twice the size, shrunk, lit, blurred, noised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

RGB = tuple[int, int, int]
_FOUR = (0.14, 0.28, 0.655, 0.87)  # tractor: trailer tandem + drive axle + steering axle
_THREE = (0.17, 0.32, 0.87)
#: class -> (cab colour, chassis colour, wheel x positions); half the Container_Small_B trucks
#: have the two colours swapped.
_LOOKS: dict[str, tuple[str, str, tuple[float, ...]]] = {
    "Container_Big_Tractor_B": ("blue", "yellow", _FOUR),
    "Container_Big_Tractor_Y": ("yellow", "blue", _FOUR),
    "Container_Small_B": ("red", "yellow", _THREE),
    "Container_Small_Gy": ("red", "blue", _THREE),
    "Loader_Tractor_R": ("red", "yellow", _FOUR),
    "Loader_Tractor_Y": ("yellow", "red", _FOUR),
}
CLASSES: tuple[str, ...] = tuple(_LOOKS)
# Base colours of the toy's plastic, as a camera sees them (not pure primaries).
_BASE = {
    "red": (192, 42, 38),
    "yellow": (234, 186, 42),
    "blue": (34, 84, 166),
    "green": (50, 136, 66),
    "tyre": (34, 33, 35),
    "glass": (62, 80, 96),
    "grey": (112, 114, 118),
    "dark": (52, 52, 56),
    "light": (226, 226, 214),
}
#: The 256 quantiles of the standard normal at (i + 0.5) / 256: a uniform byte maps to a normal.
_NOISE_LUT = np.array([NormalDist().inv_cdf((i + 0.5) / 256) for i in range(256)], dtype=np.float32)
# The truck, in truck units: x 0..1 from the rear to the front, y 0 (top) .. 0.52 (ground).
_GROUND = 0.52
_WHEEL_R = 0.068
_TRUCK_H = _GROUND + 0.01
_SS = 2  # the truck is drawn at twice the size and shrunk: smooth edges
#: (scale, cx, cy, angle, flip, colour jitter): see `_draw_pose`.
_Pose = tuple[float, float, float, float, bool, float]


class _Pen:
    """Draws in truck units (x: 0..1 rear to front, y down) onto pixels through the pose: x
    mirrored when `flip`, scaled by `scale` px per unit, rotated by `angle` about (cx, cy). A
    `part` (x0, y0, k, mirror_len) draws a part in its own units: at (x0, y0), scaled by k, x
    mirrored about mirror_len unless None."""

    def __init__(self, draw: ImageDraw.ImageDraw, pose: _Pose, part: tuple = (0, 0, 1, None)):
        scale, self.cx, self.cy, angle, self.flip, _ = pose
        self.d, self.s, self.pose, self.part = draw, scale, pose, part
        self.cos, self.sin = math.cos(angle), math.sin(angle)

    def sub(self, x0: float, y0: float, k: float, mirror_len: float | None) -> _Pen:
        return _Pen(self.d, self.pose, (x0, y0, k, mirror_len))

    def _p(self, x: float, y: float) -> tuple[float, float]:
        x0, y0, k, mirror = self.part
        x, y = x0 + (x if mirror is None else mirror - x) * k, y0 + y * k
        u = ((0.5 - x) if self.flip else (x - 0.5)) * self.s
        w = (y - _TRUCK_H / 2) * self.s
        return (self.cx + self.cos * u + self.sin * w, self.cy - self.sin * u + self.cos * w)

    def rect(self, x0: float, y0: float, x1: float, y1: float, fill: RGB) -> None:
        self.poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], fill)

    def poly(self, pts: Sequence[tuple[float, float]], fill: RGB) -> None:
        self.d.polygon([self._p(x, y) for x, y in pts], fill=fill)

    def circle(self, cx: float, cy: float, r: float, fill: RGB) -> None:
        x, y = self._p(cx, cy)
        rr = r * self.s * self.part[2]
        self.d.ellipse((x - rr, y - rr, x + rr, y + rr), fill=fill)

    def line(self, pts: Sequence[tuple[float, float]], fill: RGB, width: float) -> None:
        self.d.line([self._p(x, y) for x, y in pts], fill=fill, width=max(1, round(width * self.s)))


def _jitter(base: RGB, rng: np.random.Generator, amount: float) -> RGB:
    gains = 1.0 + rng.normal(0.0, amount, 3)
    shade = 1.0 + rng.normal(0.0, amount)
    c = np.clip(np.asarray(base, dtype=np.float64) * gains * shade, 0, 255)
    return (int(c[0]), int(c[1]), int(c[2]))


def _shade(c: RGB, f: float) -> RGB:
    return tuple(int(min(255, max(0, v * f))) for v in c)  # type: ignore[return-value]


def _draw_wheel(p: _Pen, cx: float, cy: float, r: float, col: dict[str, RGB]) -> None:
    p.circle(cx, cy, r, col["tyre"])
    p.circle(cx, cy, r * 0.82, _shade(col["tyre"], 1.35))
    p.circle(cx, cy, r * 0.50, col["hub"])
    p.circle(cx, cy, r * 0.16, _shade(col["hub"], 0.7))


def _draw_cab(p: _Pen, cab: RGB, col: dict[str, RGB]) -> None:
    p.poly([(0.76, 0.43), (0.76, 0.12), (0.895, 0.12), (0.965, 0.245), (0.975, 0.43)], cab)
    p.rect(0.755, 0.105, 0.90, 0.125, _shade(cab, 0.82))  # roof visor and a darker lower edge
    p.rect(0.76, 0.395, 0.975, 0.43, _shade(cab, 0.78))
    p.poly([(0.785, 0.15), (0.885, 0.15), (0.935, 0.245), (0.785, 0.245)], col["glass"])
    p.poly([(0.83, 0.15), (0.855, 0.15), (0.81, 0.245), (0.785, 0.245)], _shade(col["glass"], 1.6))
    p.line([(0.845, 0.255), (0.845, 0.39)], _shade(cab, 0.7), 0.004)  # door line and handle
    p.rect(0.80, 0.27, 0.825, 0.28, _shade(cab, 0.6))
    p.rect(0.95, 0.29, 0.982, 0.40, col["dark"])  # grille, bumper, headlight
    p.rect(0.945, 0.40, 0.99, 0.445, col["grey"])
    p.rect(0.962, 0.262, 0.978, 0.285, col["light"])
    p.rect(0.79, 0.43, 0.83, 0.45, col["dark"])  # step


def _big_container(p: _Pen, col: dict[str, RGB]) -> None:
    red, yel = col["red"], col["yellow"]
    x0, x1, y0, y1 = 0.03, 0.735, 0.045, 0.37
    p.rect(x0, y0, x1, y1, red)
    x = x0 + 0.13  # corrugation ribs
    while x < x1 - 0.02:
        p.rect(x, y0 + 0.02, x + 0.008, y1 - 0.02, _shade(red, 0.8))
        x += 0.04
    p.rect(x0, y0, x1, y0 + 0.018, _shade(red, 0.72))  # top and bottom rails, corner posts
    p.rect(x0, y1 - 0.018, x1, y1, _shade(red, 0.72))
    p.rect(x1 - 0.014, y0, x1, y1, _shade(red, 0.72))
    p.rect(x0, y0 + 0.018, x0 + 0.115, y1 - 0.018, yel)  # rear doors: two leaves, locking bars
    p.line([(x0 + 0.058, y0 + 0.02), (x0 + 0.058, y1 - 0.02)], _shade(yel, 0.62), 0.005)
    for bx in (x0 + 0.025, x0 + 0.09):
        p.line([(bx, y0 + 0.03), (bx, y1 - 0.03)], col["grey"], 0.006)
        p.rect(bx - 0.008, 0.22, bx + 0.008, 0.235, col["dark"])


def _small_bins(p: _Pen, bins: Sequence[RGB], col: dict[str, RGB], bed: RGB) -> None:
    rail = col["red"]
    p.rect(0.03, 0.335, 0.745, 0.372, bed)  # flat deck
    p.rect(0.03, 0.335, 0.745, 0.345, _shade(bed, 1.1))
    n = len(bins)  # bins: slightly tapered boxes with a lid
    x0, x1, gap = 0.06, 0.715, 0.018
    w = (x1 - x0 - gap * (n - 1)) / n
    for i, c in enumerate(bins):
        bx = x0 + i * (w + gap)
        p.poly([(bx, 0.175), (bx + w, 0.175), (bx + w - 0.01, 0.335), (bx + 0.01, 0.335)], c)
        p.rect(bx - 0.006, 0.16, bx + w + 0.006, 0.185, _shade(c, 0.75))
        p.rect(bx + w * 0.3, 0.205, bx + w * 0.7, 0.215, _shade(c, 0.6))
        p.line([(bx + 0.015, 0.235), (bx + w - 0.015, 0.235)], _shade(c, 0.8), 0.004)
    p.rect(0.03, 0.085, 0.745, 0.115, rail)  # the red rail above them on three posts
    p.rect(0.03, 0.105, 0.745, 0.115, _shade(rail, 0.75))
    for px in (0.03, 0.382, 0.722):
        p.rect(px, 0.085, px + 0.023, 0.335, rail)
        p.rect(px + 0.016, 0.085, px + 0.023, 0.335, _shade(rail, 0.75))


def _loader_load(p: _Pen, bed: RGB, col: dict[str, RGB], accent: RGB, facing_rear: bool) -> None:
    """A flat bed carrying a wheel loader, drawn in its own units (height 1, length 1.92)."""
    p.poly([(0.0, 0.372), (0.03, 0.325), (0.745, 0.325), (0.745, 0.372)], bed)
    p.rect(0.03, 0.325, 0.745, 0.335, _shade(bed, 1.1))
    p.line([(0.04, 0.352), (0.735, 0.352)], _shade(bed, 0.75), 0.004)
    body = col["yellow"]
    q = p.sub(0.08, 0.325 - 0.30, 0.30, 1.92 if facing_rear else None)
    tyre = {"tyre": col["tyre"], "hub": _shade(body, 0.95)}
    q.rect(0.02, 0.36, 0.14, 0.74, _shade(body, 0.85))  # rear counterweight, engine hood, frame
    q.rect(0.06, 0.28, 0.66, 0.60, body)
    q.rect(0.06, 0.28, 0.66, 0.32, _shade(body, 1.12))
    q.rect(0.10, 0.56, 1.48, 0.78, _shade(body, 0.92))
    q.rect(0.20, 0.14, 0.25, 0.30, col["dark"])  # exhaust stack
    q.rect(0.60, 0.0, 1.10, 0.07, accent)  # cab: roof, pillars, glass
    q.rect(0.63, 0.05, 1.06, 0.56, accent)
    q.rect(0.69, 0.10, 1.00, 0.40, col["glass"])
    q.poly([(0.78, 0.10), (0.84, 0.10), (0.74, 0.40), (0.69, 0.40)], _shade(col["glass"], 1.6))
    q.poly([(0.98, 0.40), (1.64, 0.56), (1.64, 0.70), (0.98, 0.54)], accent)  # lift arm and bucket
    q.poly([(1.56, 0.34), (1.72, 0.32), (1.93, 0.97), (1.60, 0.99), (1.52, 0.82)], accent)
    q.poly([(1.60, 0.40), (1.70, 0.38), (1.86, 0.94), (1.62, 0.95)], _shade(accent, 0.78))
    for wx in (0.42, 1.24):
        _draw_wheel(q, wx, 0.77, 0.23, tyre)


def _draw_truck(label: str, rng: np.random.Generator, p: _Pen, col_jit: float) -> None:
    col = {k: _jitter(v, rng, col_jit) for k, v in _BASE.items()}
    col["hub"] = _jitter(_BASE["yellow"], rng, col_jit)
    cab_colour, chassis_colour, wheels = _LOOKS[label]
    if label == "Container_Small_B" and rng.random() >= 0.5:
        cab_colour, chassis_colour = chassis_colour, cab_colour
    cab, chassis = col[cab_colour], col[chassis_colour]
    p.rect(0.03, 0.37, 0.95, 0.435, chassis)  # chassis, and the mudguard over the front wheel
    p.rect(0.03, 0.42, 0.95, 0.435, _shade(chassis, 0.75))
    p.poly([(0.79, 0.40), (0.81, 0.36), (0.93, 0.36), (0.95, 0.40)], _shade(chassis, 0.9))
    if label.startswith("Container_Big"):
        _big_container(p, col)
    elif label.startswith("Container_Small"):
        n = 4 if rng.random() < 0.5 else 5
        if label == "Container_Small_B":
            bins = [_jitter(col["blue"], rng, col_jit * 0.5) for _ in range(n)]
        else:
            first = int(rng.integers(2))
            pair = (col["green"], col["yellow"])
            bins = [_jitter(pair[(i + first) % 2], rng, col_jit * 0.5) for i in range(n)]
        _small_bins(p, bins, col, chassis)
    else:
        accent = col["yellow"] if label == "Loader_Tractor_R" else col["blue"]
        _loader_load(p, chassis, col, accent, bool(rng.random() < 0.5))
    _draw_cab(p, cab, col)
    for x in wheels:
        _draw_wheel(p, x, _GROUND - _WHEEL_R, _WHEEL_R, col)


def _draw_pose(rng: np.random.Generator, c: int, d: float) -> _Pose:
    """The truck's pose on a c x c canvas, spread wider as `d` grows, always in the frame."""
    frac = float(np.clip(rng.normal(0.72, 0.015 + 0.07 * d), 0.5, 0.86))
    angle = math.radians(float(rng.uniform(-1, 1) * (0.8 + 9.0 * d)))
    flip = bool(rng.random() < min(0.5, d))
    scale = frac * c
    ca, sa = abs(math.cos(angle)), abs(math.sin(angle))
    half_w = scale / 2 * (ca * 1.0 + sa * _TRUCK_H)
    half_h = scale / 2 * (sa * 1.0 + ca * _TRUCK_H)
    slack_x = max(0.0, c / 2 - half_w) + 0.02 * c
    slack_y = max(0.0, c / 2 - half_h)
    cx = c / 2 + rng.uniform(-1, 1) * min(slack_x, (0.02 + 0.10 * d) * c)
    cy = c / 2 + 0.03 * c + rng.uniform(-1, 1) * min(slack_y, (0.03 + 0.15 * d) * c)
    return scale, cx, cy, angle, flip, 0.025 + 0.035 * d


def _background(rng: np.random.Generator, n: int, difficulty: float) -> np.ndarray:
    """A light backdrop (n x n x 3 float32): a tint and a slight linear gradient."""
    level = rng.uniform(214, 242)
    tint = rng.normal(0.0, 2.5 + 5.0 * difficulty, 3)
    amp = rng.uniform(0.0, 6.0 + 22.0 * difficulty)
    theta = rng.uniform(0, 2 * math.pi)
    t = np.linspace(-0.5, 0.5, n, dtype=np.float32)
    g = math.cos(theta) * t[None, :] + math.sin(theta) * t[:, None]
    base = (level + tint).astype(np.float32)
    return base[None, None, :] + (amp * g)[:, :, None]


def _composite_truck(bg: np.ndarray, label: str, rng: np.random.Generator, pose: _Pose) -> None:
    """Draw the truck (at `_SS` times the size) and lay it, shaded and with a contact shadow,
    onto the float32 (n, n, 3) `bg` in place, only within the box it can cover."""
    scale, cx, cy, angle, flip, col_jit = pose
    ss = _SS
    probe = _Pen(None, pose)  # type: ignore[arg-type]
    corners = [probe._p(x, y) for x in (-0.1, 1.1) for y in (-0.02, _GROUND + 0.05)]
    xs, ys, n = [p[0] for p in corners], [p[1] for p in corners], bg.shape[0]
    x0, x1 = max(0, int(min(xs) // ss) - 1), min(n, int(math.ceil(max(xs) / ss)) + 1)
    y0, y1 = max(0, int(min(ys) // ss) - 1), min(n, int(math.ceil(max(ys) / ss)) + 1)
    layer = Image.new("RGBA", ((x1 - x0) * ss, (y1 - y0) * ss), (0, 0, 0, 0))
    pen = _Pen(ImageDraw.Draw(layer), (scale, cx - x0 * ss, cy - y0 * ss, angle, flip, col_jit))
    _draw_truck(label, rng, pen, col_jit)
    # premultiplied alpha, then a box shrink: no dark fringes at the edges
    small = np.asarray(layer.convert("RGBa").reduce(ss), dtype=np.float32)
    alpha = small[..., 3:4] * np.float32(1 / 255)
    # truck-frame coordinates (u along, w down; truck units about its centre) of the box's pixels
    dx = ((np.arange(x1 - x0, dtype=np.float32) + 0.5) * ss - pen.cx)[None, :]
    dy = ((np.arange(y1 - y0, dtype=np.float32) + 0.5) * ss - pen.cy)[:, None]
    u = (pen.cos * dx - pen.sin * dy) / pen.s
    w = (pen.sin * dx + pen.cos * dy) / pen.s
    # a soft contact shadow under the wheels
    gw = w - np.float32(_GROUND - _TRUCK_H / 2 + 0.004)
    r = np.sqrt((u * np.float32(1 / 0.52)) ** 2 + (gw * np.float32(1 / 0.032)) ** 2)
    shadow = np.float32(0.42) * np.clip((1.15 - r) * np.float32(1 / 0.65), 0.0, 1.0) ** 1.5
    # top-lit shading, so the flat drawing reads as a moulded object
    ramp = np.clip(np.float32(1.07 - 0.11) - np.float32(0.22 / _TRUCK_H) * w, 0.8, 1.1)
    region = bg[y0:y1, x0:x1]
    bg[y0:y1, x0:x1] = (
        region * ((1.0 - shadow)[..., None] * (1.0 - alpha)) + small[..., :3] * ramp[..., None]
    )


def _camera(a: np.ndarray, rng: np.random.Generator, size: int, d: float) -> Image.Image:
    """The float32 scene `a` (changed in place) as a uint8 RGB photo: white balance, brightness,
    contrast, focus blur and sensor noise (the last two skipped when too faint to matter)."""
    wb = 1.0 + rng.normal(0.0, 0.01 + 0.035 * d, 3).astype(np.float32)
    bright = 1.0 + rng.uniform(-1, 1) * 0.22 * d
    contrast = 1.0 + rng.uniform(-1, 1) * 0.30 * d
    mean = float(a.mean())
    a *= (contrast * bright * wb).astype(np.float32)  # ((a - mean) * contrast + mean) * bright * wb
    a += (mean * (1.0 - contrast) * bright * wb).astype(np.float32)
    img = Image.fromarray(np.clip(a, 0, 255, out=a).astype(np.uint8), "RGB")
    blur = rng.uniform(0.0, 1.0) * 1.6 * d * size / 224
    if blur > 0.15:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    sigma = rng.uniform(0.3, 1.0) * 9.0 * d
    if sigma > 0.5:
        # Gaussian noise through a table of normal quantiles: much cheaper than drawing normals
        a = _NOISE_LUT[rng.integers(0, 256, (size, size, 3), dtype=np.uint8)]
        a *= np.float32(sigma)
        a += np.asarray(img)
        np.rint(a, out=a)
        img = Image.fromarray(np.clip(a, 0, 255, out=a).astype(np.uint8), "RGB")
    return img


def check_size_and_difficulty(size: int, difficulty: float) -> None:
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty must be in [0, 1], got {difficulty}")


def render(label: str, rng: np.random.Generator, size: int, difficulty: float) -> Image.Image:
    """One photo of class `label`: a size x size RGB `PIL.Image`, the same for the same `rng`
    state. `difficulty` in [0, 1] widens the jitter (0: studio shots). ValueError: bad argument."""
    if label not in CLASSES:
        raise ValueError(f"unknown class {label!r}; expected one of {', '.join(CLASSES)}")
    check_size_and_difficulty(int(size), difficulty)
    size, d = int(size), float(difficulty)
    pose = _draw_pose(rng, size * _SS, d)
    bg = _background(rng, size, d)
    _composite_truck(bg, label, rng, pose)
    return _camera(bg, rng, size, d)
