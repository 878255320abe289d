"""Card pictures for the templates browser: one illustrative JPEG per shipped workflow, drawn with PIL.

Each card names the model and the task in large type, shows the workflow's stages as a row of
boxes (the one this template is about highlighted) and two badges (steps, card size...). Drawn
from the template's description only, with Pillow's bundled font, so ``build_workflows.py``
writes the same pictures every time it runs.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SIZE = (512, 512)
# Background gradient (top, bottom) per model family.
PALETTES = {
    "klein": ((18, 74, 92), (8, 24, 40)),
    "dev": ((70, 40, 110), (18, 12, 40)),
    "base": ((110, 70, 20), (40, 22, 8)),
}
ACCENT = (255, 214, 102)
TEXT = (245, 245, 245)
MUTED = (190, 200, 210)
# Stages that are the template's point get the accent colour.
ORDINARY_STAGES = {"models", "prompt", "sample", "save"}


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _gradient(top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    w, h = SIZE
    img = Image.new("RGB", SIZE)
    draw = ImageDraw.Draw(img)
    for y in range(h):
        t = y / (h - 1)
        draw.line([(0, y), (w, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))
    return img


def _palette(model: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    if "base" in model:
        return PALETTES["base"]
    return PALETTES["dev" if model.startswith("dev") else "klein"]


def draw_card(path: Path, model: str, task: str, badges: list[str], steps: list[str]) -> Path:
    """Writes one card.

    Args:
        path: the ``.jpg`` to write (next to the workflow, same name).
        model: e.g. "klein 4B", "dev".
        task: what the workflow does, e.g. "text to image".
        badges: two short facts shown at the bottom, e.g. ["4 steps", "8-12 GB"].
        steps: the workflow's stages left to right, e.g. ["models", "prompt", "sample", "save"].
    """
    img = _gradient(*_palette(model))
    draw = ImageDraw.Draw(img)
    w, h = SIZE
    draw.text((36, 34), "FLUX.2", font=_font(34), fill=MUTED)
    draw.text((36, 76), model, font=_font(66), fill=TEXT)
    size = 50 if len(task) <= 14 else 40 if len(task) <= 19 else 34
    draw.text((36, 172), task, font=_font(size), fill=ACCENT)

    # The pipeline as boxes joined by arrows, spread over the card's width.
    n = len(steps)
    gap, margin, top, box_h = 14, 30, 290, 58
    box_w = (w - 2 * margin - gap * (n - 1)) / n
    label = _font(17 if n <= 4 else 15)
    for i, stage in enumerate(steps):
        x0 = margin + i * (box_w + gap)
        special = stage not in ORDINARY_STAGES
        draw.rounded_rectangle(
            [x0, top, x0 + box_w, top + box_h],
            radius=10,
            fill=ACCENT if special else None,
            outline=ACCENT if special else MUTED,
            width=2,
        )
        tw = draw.textlength(stage, font=label)
        draw.text(
            (x0 + (box_w - tw) / 2, top + box_h / 2 - 10),
            stage,
            font=label,
            fill=(30, 30, 30) if special else TEXT,
        )
        if i < n - 1:
            ax = x0 + box_w + 2
            draw.line([(ax, top + box_h / 2), (ax + gap - 4, top + box_h / 2)], fill=MUTED, width=2)

    # Badges.
    badge = _font(24)
    x = 36
    for text in badges:
        tw = draw.textlength(text, font=badge)
        draw.rounded_rectangle([x, h - 104, x + tw + 32, h - 54], radius=25, outline=TEXT, width=2)
        draw.text((x + 16, h - 94), text, font=badge, fill=TEXT)
        x += tw + 52
    draw.text((36, h - 36), "Flux2Local", font=_font(18), fill=MUTED)
    img.save(path, "JPEG", quality=88)
    return path
