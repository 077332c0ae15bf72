"""Draw the sample input images for the vendor page's image-to-video examples.

    python scripts/make_sample_images.py [OUT_DIR]   # default: data/images

Procedural drawings (numpy, written as JPEG with PyAV), deterministic and our own:
``salmon_dish.jpg`` (a plate of salmon, 640x480), ``pavilion_park.jpg`` (a pavilion by a lotus
pond with two small dogs, 640x426) and ``tiger.jpg`` (a tiger's face, 480x600, portrait) — three
different aspect ratios, so ``aspect_ratio: "auto"`` is exercised in landscape and portrait.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import av
import numpy as np

Color = tuple[float, float, float]


class Canvas:
    """An RGB float image with anti-aliased shape painting (alpha masks, no per-pixel loops)."""

    def __init__(self, width: int, height: int, color: Color) -> None:
        self.width, self.height = width, height
        self.y, self.x = np.mgrid[0:height, 0:width].astype(np.float32)
        self.rgb = np.empty((height, width, 3), dtype=np.float32)
        self.rgb[...] = color

    def paint(self, alpha: np.ndarray, color: Color | np.ndarray) -> None:
        a = np.clip(alpha, 0.0, 1.0)[..., None]
        self.rgb = self.rgb * (1.0 - a) + np.asarray(color, dtype=np.float32) * a

    def ellipse(
        self, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, power: float = 2.0
    ) -> np.ndarray:
        """Alpha of a (rotated, optionally squarish with power > 2) ellipse, soft 1 px edge."""
        c, s = math.cos(angle), math.sin(angle)
        u = ((self.x - cx) * c + (self.y - cy) * s) / rx
        v = (-(self.x - cx) * s + (self.y - cy) * c) / ry
        d = (np.abs(u) ** power + np.abs(v) ** power) ** (1.0 / power)
        return (1.0 - d) * min(rx, ry)

    def polygon(self, points: list[tuple[float, float]]) -> np.ndarray:
        """Alpha of a convex polygon given clockwise (in image coordinates)."""
        alpha = np.full(self.x.shape, np.inf, dtype=np.float32)
        for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1], strict=True):
            nx, ny = y1 - y0, x0 - x1  # inward normal for clockwise order on screen
            norm = math.hypot(nx, ny) or 1.0
            dist = ((self.x - x0) * nx + (self.y - y0) * ny) / norm
            alpha = np.minimum(alpha, -dist)
        return alpha

    def to_uint8(self) -> np.ndarray:
        return np.clip(self.rgb + 0.5, 0, 255).astype(np.uint8)


def _grain(canvas: Canvas, seed: int, amount: float) -> None:
    """A little fixed noise, so the drawings compress like photos rather than flat art."""
    rng = np.random.default_rng(seed)
    canvas.rgb += rng.normal(0.0, amount, size=canvas.rgb.shape[:2])[..., None]


def salmon_dish() -> np.ndarray:
    c = Canvas(640, 480, (150, 100, 60))
    # wooden table: wavy grain
    grain = np.sin(c.y * 0.16 + 3.0 * np.sin(c.x * 0.012) + np.sin(c.x * 0.05) * 0.4)
    c.rgb += (grain * 14.0)[..., None]
    c.paint(c.ellipse(335, 268, 262, 196), (70, 45, 25))  # plate shadow
    c.paint(c.ellipse(320, 250, 260, 192), (236, 236, 230))  # plate
    c.paint(c.ellipse(320, 250, 205, 150) + 3.0, (214, 214, 208))  # rim line
    c.paint(c.ellipse(320, 250, 200, 146), (244, 244, 240))  # well
    # salmon fillet: a squarish rotated blob with fat lines and a seared top
    angle = -0.25
    fillet = c.ellipse(305, 238, 125, 62, angle, power=3.5)
    c.paint(fillet, (238, 118, 78))
    cos, sin = math.cos(angle), math.sin(angle)
    u = (c.x - 305) * cos + (c.y - 238) * sin
    v = -(c.x - 305) * sin + (c.y - 238) * cos
    fat = np.clip((np.sin(u * 0.11 + v * 0.045) - 0.8) * 5.0, 0, 1)
    c.paint(np.minimum(np.clip(fillet, 0, 1), fat), (252, 200, 175))
    sear = np.clip((-v - 35) / 25.0, 0, 1)
    c.paint(np.minimum(np.clip(fillet, 0, 1), sear * 0.8), (150, 70, 35))
    # lemon slice with segments
    c.paint(c.ellipse(190, 335, 48, 48), (245, 235, 150))
    c.paint(c.ellipse(190, 335, 42, 42), (250, 215, 60))
    theta = np.arctan2(c.y - 335, c.x - 190)
    spokes = np.clip((np.cos(theta * 8) - 0.93) * 12, 0, 1)
    c.paint(np.minimum(np.clip(c.ellipse(190, 335, 40, 40), 0, 1), spokes), (250, 240, 190))
    # herbs and asparagus
    for i, (x, y) in enumerate([(420, 320), (445, 298), (470, 330), (430, 350), (455, 360)]):
        c.paint(c.ellipse(x, y, 22, 8, angle=0.6 + i * 0.7), (60, 140 + i * 6, 50))
    for k in range(3):
        x0 = 380 + k * 18
        c.paint(
            c.polygon([(x0, 150), (x0 + 10, 150), (x0 + 70, 330), (x0 + 60, 332)]), (95, 150, 60)
        )
    for x, y in [(250, 330), (275, 345), (330, 340), (380, 330), (260, 170), (380, 180)]:
        c.paint(c.ellipse(x, y, 6, 6), (140, 30, 40))  # sauce dots
    _grain(c, 1, 3.0)
    return c.to_uint8()


def pavilion_park() -> np.ndarray:
    w, h = 640, 426
    c = Canvas(w, h, (0, 0, 0))
    t = np.clip(c.y / 160.0, 0, 1)[..., None]
    c.rgb = (
        np.asarray((110, 170, 232), np.float32) * (1 - t)
        + np.asarray((205, 228, 245), np.float32) * t
    )
    rng = np.random.default_rng(7)
    for _ in range(70):  # a band of trees
        x, y, r = rng.uniform(-20, w + 20), rng.uniform(70, 215), rng.uniform(22, 48)
        shade = rng.uniform(0.7, 1.15)
        c.paint(c.ellipse(x, y, r, r * 0.9), (45 * shade, 120 * shade, 50 * shade))
    # pond with ripples
    pond = np.clip(c.y - 240, 0, 1)
    ripple = np.sin(c.y * 0.7 + np.sin(c.x * 0.03) * 2.0) * 6.0
    c.paint(pond, (55, 110, 105))
    c.rgb += (ripple * pond)[..., None]
    for _ in range(55):  # lotus leaves and flowers
        x, y = rng.uniform(0, w), rng.uniform(262, h)
        r = 10 + (y - 250) * 0.12
        c.paint(c.ellipse(x, y, r * 1.5, r * 0.6), (75, 150, 60))
        if rng.random() < 0.3:
            c.paint(c.ellipse(x + 4, y - r * 0.5, r * 0.35, r * 0.45), (240, 150, 190))
    # the pavilion: platform, red pillars, dark roof with upturned eaves
    c.paint(c.polygon([(300, 228), (540, 228), (552, 252), (288, 252)]), (120, 100, 80))
    for x in (318, 378, 458, 518):
        c.paint(c.polygon([(x - 5, 150), (x + 5, 150), (x + 5, 230), (x - 5, 230)]), (172, 40, 32))
    roof_mid, half = 418.0, 150.0
    eave = 150 - ((np.abs(c.x - roof_mid) / half) ** 4) * 22.0
    roof = np.minimum(
        np.minimum(eave - c.y, c.y - (112 + np.abs(c.x - roof_mid) * 0.18)),
        half - np.abs(c.x - roof_mid),
    )
    c.paint(roof, (52, 55, 62))
    c.paint(c.polygon([(360, 104), (476, 104), (470, 114), (366, 114)]), (40, 42, 48))  # ridge
    # wooden walkway from the front left to the pavilion, with planks
    walk = c.polygon([(0, 335), (300, 238), (300, 252), (0, 372)])
    c.paint(walk, (150, 105, 60))
    planks = np.clip((np.sin(c.x * 0.45) - 0.85) * 6, 0, 1)
    c.paint(np.minimum(np.clip(walk, 0, 1), planks), (110, 75, 40))
    # two small dogs on the walkway: a white poodle and a brown shiba inu
    for x, y, fur in ((112, 312, (246, 246, 242)), (188, 286, (205, 128, 62))):
        c.paint(c.ellipse(x, y, 20, 12), fur)
        c.paint(c.ellipse(x + 20, y - 12, 10, 10), fur)
        c.paint(c.ellipse(x - 20, y - 10, 5, 9, angle=-0.6), fur)
        for lx in (x - 12, x + 10):
            c.paint(
                c.polygon([(lx - 3, y + 6), (lx + 3, y + 6), (lx + 3, y + 20), (lx - 3, y + 20)]),
                fur,
            )
        c.paint(c.ellipse(x + 24, y - 14, 2, 2), (20, 20, 20))
    _grain(c, 2, 2.5)
    return c.to_uint8()


def tiger() -> np.ndarray:
    w, h = 480, 600
    c = Canvas(w, h, (0, 0, 0))
    t = (c.y / h)[..., None]
    c.rgb = (
        np.asarray((30, 70, 35), np.float32) * (1 - t) + np.asarray((15, 40, 20), np.float32) * t
    )
    rng = np.random.default_rng(11)
    for _ in range(40):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        c.paint(
            c.ellipse(x, y, 40, 12, angle=rng.uniform(0, math.pi)),
            (40, 100 + rng.uniform(0, 40), 45),
        )
    orange, white, black = (232, 132, 40), (245, 240, 230), (25, 20, 18)
    for ex in (110, 370):  # ears
        c.paint(c.ellipse(ex, 170, 58, 58), orange)
        c.paint(c.ellipse(ex, 175, 34, 34), black)
        c.paint(c.ellipse(ex, 182, 22, 22), white)
    face = c.ellipse(240, 330, 195, 205)
    c.paint(face, orange)
    inside = np.clip(face, 0, 1)
    # stripes: wavy vertical ones on the forehead, sweeping ones on the cheeks
    forehead = np.clip(
        (np.abs(np.sin((c.x - 240) * 0.075 + np.sin(c.y * 0.05) * 0.6)) - 0.8) * 8, 0, 1
    )
    forehead *= np.clip((250 - c.y) / 30, 0, 1) * np.clip((c.y - 140) / 20, 0, 1)
    cheeks = np.clip((np.abs(np.sin(c.y * 0.08 + np.abs(c.x - 240) * 0.02)) - 0.85) * 8, 0, 1)
    cheeks *= np.clip((np.abs(c.x - 240) - 120) / 20, 0, 1)
    c.paint(np.minimum(inside, np.maximum(forehead, cheeks)), black)
    for ex in (175, 305):  # white brows, eyes, pupils
        c.paint(c.ellipse(ex, 258, 38, 18), white)
        c.paint(c.ellipse(ex, 292, 34, 22), black)
        c.paint(c.ellipse(ex, 292, 30, 19), (205, 200, 70))
        c.paint(c.ellipse(ex, 292, 8, 17), black)
        c.paint(c.ellipse(ex + 8, 286, 4, 4), white)
    c.paint(c.ellipse(200, 425, 62, 52), white)  # muzzle and chin
    c.paint(c.ellipse(280, 425, 62, 52), white)
    c.paint(c.ellipse(240, 480, 55, 42), white)
    c.paint(c.polygon([(212, 360), (268, 360), (240, 398)]), (215, 120, 125))  # nose
    c.paint(c.ellipse(240, 500, 26, 38), (225, 95, 115))  # the tongue, sticking out
    c.paint(c.ellipse(240, 468, 40, 6), black)  # mouth line
    for side in (-1, 1):  # whisker dots
        for k in range(3):
            c.paint(c.ellipse(240 + side * (50 + k * 16), 418 + k * 8, 3, 3), black)
    _grain(c, 3, 3.0)
    return c.to_uint8()


def write_jpeg(path: Path, rgb: np.ndarray, qscale: int = 4) -> None:
    """Write one RGB frame as a baseline JPEG through FFmpeg's mjpeg encoder."""
    height, width = rgb.shape[:2]
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream("mjpeg", rate=1)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuvj420p"
        stream.codec_context.flags |= av.codec.context.Flags.qscale
        stream.codec_context.qmin = stream.codec_context.qmax = qscale
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


IMAGES = {"salmon_dish.jpg": salmon_dish, "pavilion_park.jpg": pavilion_park, "tiger.jpg": tiger}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else Path(__file__).resolve().parent.parent / "data" / "images"
    out.mkdir(parents=True, exist_ok=True)
    for name, draw in IMAGES.items():
        path = out / name
        write_jpeg(path, draw())
        print(f"{path} {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
