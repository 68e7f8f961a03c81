"""Write a few small example training images of one made-up object (a toy robot) to a folder.

    python examples/make_images.py OUT_DIR

Deterministic (same pictures every time), drawn with Pillow so the README's main job needs no
download. Each image shows the same robot at a different place, size and background; one has a
caption file (robot-2.txt) to show per-image captions. Real use: put your own photos in a folder.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 96
BACKGROUNDS = [(214, 232, 246), (238, 226, 204), (205, 230, 208), (240, 214, 226)]


def draw_robot(draw: ImageDraw.ImageDraw, x: int, y: int, scale: float) -> None:
    def box(x0, y0, x1, y1, fill):
        draw.rectangle([x + x0 * scale, y + y0 * scale, x + x1 * scale, y + y1 * scale], fill=fill, outline=(30, 30, 30))

    box(10, 0, 30, 14, (200, 60, 50))  # head
    draw.ellipse([x + 14 * scale, y + 4 * scale, x + 18 * scale, y + 8 * scale], fill=(255, 230, 80))
    draw.ellipse([x + 22 * scale, y + 4 * scale, x + 26 * scale, y + 8 * scale], fill=(255, 230, 80))
    draw.line([x + 20 * scale, y, x + 20 * scale, y - 6 * scale], fill=(30, 30, 30), width=max(1, int(scale)))
    box(6, 15, 34, 38, (60, 90, 200))  # body
    box(0, 17, 5, 32, (150, 150, 160))  # arms
    box(35, 17, 40, 32, (150, 150, 160))
    box(10, 39, 17, 50, (80, 80, 90))  # legs
    box(23, 39, 30, 50, (80, 80, 90))


def make_images(out: Path, count: int = 4) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    paths = []
    for index in range(count):
        image = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[index % len(BACKGROUNDS)])
        draw = ImageDraw.Draw(image)
        draw.rectangle([0, int(SIZE * 0.8), SIZE, SIZE], fill=(120, 100, 80))  # floor
        scale = rng.uniform(1.1, 1.5)
        x = rng.randint(4, int(SIZE - 41 * scale))
        y = int(SIZE * 0.82 - 50 * scale)
        draw_robot(draw, x, y, scale)
        path = out / f"robot-{index}.png"
        image.save(path)
        paths.append(path)
    (out / "robot-2.txt").write_text("standing in a pink room\n")
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/make_images.py OUT_DIR")
    for path in make_images(Path(sys.argv[1])):
        print(path)
