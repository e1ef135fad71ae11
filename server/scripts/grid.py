"""Grid labels the way A1111's `modules/images.py` draws them: `draw_grid_annotations` (axis labels on top
and on the left) and `draw_prompt_matrix`. The grid itself is `sd15.preview.image_grid` (on `BACKGROUND`);
SD upscale's overlapping tiles are `sd15.upscale.split_grid` / `combine_grid`.

Text uses Pillow's built-in scalable font (`ImageFont.load_default(size)`) instead of A1111's Roboto, so
the label pixels differ from A1111's while the layout rules (font size, paddings, wrapping, shrinking a
line until it fits) are A1111's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

# A1111's option defaults grid_text_active_color, grid_text_inactive_color, grid_background_color
TEXT_ACTIVE = (0, 0, 0)
TEXT_INACTIVE = (153, 153, 153)
BACKGROUND = (255, 255, 255)


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(1, size))


@dataclass
class GridAnnotation:
    text: str = ""
    is_active: bool = True
    size: tuple = (0, 0)  # set when drawn
    allowed_width: int = 0


def draw_grid_annotations(im: Image.Image, width: int, height: int, hor_texts: list, ver_texts: list,
                          margin: int = 0) -> Image.Image:
    """`im` is a grid of `width`x`height` cells; returns it with a label row on top (one list of
    GridAnnotation lines per column) and a label column on the left (one list per row), the cells spread
    apart by `margin` pixels. Inactive lines are grey and struck through (prompt matrix)."""
    fontsize = (width + height) // 25
    line_spacing = fontsize // 2
    fnt = font(fontsize)
    pad_left = 0 if sum(len(line.text) for lines in ver_texts for line in lines) == 0 else width * 3 // 4

    cols, rows = im.width // width, im.height // height
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def wrapped(lines: list, allowed_width: int) -> list:
        """The lines word-wrapped to `allowed_width` pixels, each with its size."""
        out = []
        for line in lines:
            texts = [""]
            for word in line.text.split():
                joined = f"{texts[-1]} {word}".strip()
                if measure.textlength(joined, font=fnt) <= allowed_width:
                    texts[-1] = joined
                else:
                    texts.append(word)
            for text in texts:
                x0, y0, x1, y1 = measure.multiline_textbbox((0, 0), text, font=fnt)
                out.append(GridAnnotation(text, line.is_active, (x1 - x0, y1 - y0), allowed_width))
        return out

    hor_texts = [wrapped(lines, width) for lines in hor_texts]
    ver_texts = [wrapped(lines, pad_left) for lines in ver_texts]

    hor_heights = [sum(line.size[1] + line_spacing for line in lines) - line_spacing for lines in hor_texts]
    ver_heights = [sum(line.size[1] + line_spacing for line in lines) - line_spacing * len(lines)
                   for lines in ver_texts]
    pad_top = 0 if sum(hor_heights) == 0 else max(hor_heights) + line_spacing * 2

    result = Image.new("RGB", (im.width + pad_left + margin * (cols - 1), im.height + pad_top + margin * (rows - 1)),
                       BACKGROUND)
    for row in range(rows):
        for col in range(cols):
            cell = im.crop((width * col, height * row, width * (col + 1), height * (row + 1)))
            result.paste(cell, (pad_left + (width + margin) * col, pad_top + (height + margin) * row))

    d = ImageDraw.Draw(result)

    def draw_texts(x, y, lines):
        for line in lines:
            f, size = fnt, fontsize
            while d.multiline_textbbox((0, 0), line.text, font=f)[2] > line.allowed_width and size > 1:
                size -= 1  # shrink a line that does not fit its cell (A1111 does the same)
                f = font(size)
            d.multiline_text((x, y + line.size[1] / 2), line.text, font=f, anchor="mm", align="center",
                             fill=TEXT_ACTIVE if line.is_active else TEXT_INACTIVE)
            if not line.is_active:
                d.line((x - line.size[0] // 2, y + line.size[1] // 2, x + line.size[0] // 2, y + line.size[1] // 2),
                       fill=TEXT_INACTIVE, width=4)
            y += line.size[1] + line_spacing

    for col in range(cols):
        draw_texts(pad_left + (width + margin) * col + width / 2, pad_top / 2 - hor_heights[col] / 2, hor_texts[col])
    for row in range(rows):
        draw_texts(pad_left / 2, pad_top + (height + margin) * row + height / 2 - ver_heights[row] / 2, ver_texts[row])
    return result


def draw_prompt_matrix(im: Image.Image, width: int, height: int, parts: list, margin: int = 0) -> Image.Image:
    """Labels of a prompt-matrix grid: the first half of the variable parts across the top, the rest down
    the left; in each cell label a part is active (black) when that cell's prompt has it."""
    prompts = parts[1:]
    boundary = math.ceil(len(prompts) / 2)
    horiz, vert = prompts[:boundary], prompts[boundary:]

    def labels(texts):
        return [[GridAnnotation(x, is_active=pos & (1 << i) != 0) for i, x in enumerate(texts)]
                for pos in range(1 << len(texts))]
    return draw_grid_annotations(im, width, height, labels(horiz), labels(vert), margin)
