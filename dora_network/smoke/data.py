"""Training images for the smoke trainer: a seeded synthetic set of coloured shapes, or a kohya-style image folder.

The synthetic set is drawn with torch alone (no files, no downloads): each image is one shape in one colour on a
background of another colour, captioned the way a person would ("a red circle on a blue background"). Equal seeds
give bit-identical images, so every rank of a distributed run and every re-run trains on the same data.

A folder follows sd-scripts' DreamBooth-style layout: images (``.png``/``.jpg``/``.jpeg``/``.webp``/``.bmp``) with
same-stem ``.txt`` captions, either directly in the folder or in ``<repeats>_<class tokens>`` subfolders (an image
without a caption file is captioned with its subfolder's class tokens). Images are resized so the shorter side is the
resolution, then center-cropped.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

logger = logging.getLogger(__name__)

__all__ = ["COLORS", "SHAPES", "Example", "load_image_folder", "synthetic_examples"]

#: colour name -> RGB in [0, 1]; every name is one token of the tiny tokenizer.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.75, 0.2),
    "blue": (0.1, 0.25, 0.9),
    "yellow": (0.95, 0.9, 0.1),
    "orange": (1.0, 0.55, 0.0),
    "purple": (0.55, 0.15, 0.75),
    "white": (0.97, 0.97, 0.97),
    "black": (0.03, 0.03, 0.03),
    "gray": (0.5, 0.5, 0.5),
    "cyan": (0.1, 0.85, 0.9),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "ring", "cross", "diamond")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_REPEATS_DIR = re.compile(r"^(\d+)_(.*)$")


@dataclass(frozen=True)
class Example:
    """One training image.

    Attributes:
        image: ``(3, H, W)`` float32 in [-1, 1] (the VAE's input range).
        caption: its caption.
    """

    image: torch.Tensor
    caption: str


def _shape_mask(shape: str, size: int, cx: float, cy: float, radius: float) -> torch.Tensor:
    """Boolean ``(size, size)`` mask of one shape centred at (cx, cy) in pixels."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "ring":
        dist2 = dx**2 + dy**2
        return (dist2 <= radius**2) & (dist2 >= (0.6 * radius) ** 2)
    if shape == "square":
        return (dx.abs() <= radius * 0.85) & (dy.abs() <= radius * 0.85)
    if shape == "diamond":
        return dx.abs() + dy.abs() <= radius
    if shape == "cross":
        arm = radius * 0.3
        inside = (dx.abs() <= radius) & (dy.abs() <= radius)
        return inside & ((dx.abs() <= arm) | (dy.abs() <= arm))
    if shape == "triangle":  # apex up; the half-width grows linearly from apex (top) to base (bottom)
        top, bottom = cy - radius, cy + radius * 0.8
        half_width = (y - top) / (bottom - top) * radius
        return (y >= top) & (y <= bottom) & (dx.abs() <= half_width)
    raise ValueError(f"unknown shape '{shape}'; known: {', '.join(SHAPES)}")


def synthetic_examples(count: int, resolution: int, seed: int, shapes: Sequence[str] = SHAPES,
                       colors: Sequence[str] | None = None) -> list[Example]:
    """Draw ``count`` captioned images of coloured shapes, deterministically from ``seed``.

    Shapes, colours, positions and sizes come from a private ``torch.Generator``, so the global RNG is untouched.
    Shape and background colour always differ.

    Args:
        count: number of images (>= 1).
        resolution: side of the square images in pixels.
        seed: the data seed.
        shapes: the shapes to draw from (default: all of :data:`SHAPES`).
        colors: the colours to draw from, for shapes and backgrounds (default: all of :data:`COLORS`; at least two).

    Returns:
        The examples, in a fixed order.

    Raises:
        ValueError: ``count`` or ``resolution`` is not positive.
    """
    if count < 1 or resolution < 1:
        raise ValueError(f"synthetic data needs count >= 1 and resolution >= 1, got count={count}, "
                         f"resolution={resolution}")
    unknown = sorted(set(shapes) - set(SHAPES)) + sorted(set(colors or ()) - set(COLORS))
    if unknown or not shapes or (colors is not None and len(set(colors)) < 2):
        raise ValueError(f"unknown or empty shapes/colours {unknown}; known shapes: {', '.join(SHAPES)}; colours: "
                         f"{', '.join(COLORS)}")
    rng = torch.Generator().manual_seed(int(seed))
    names = list(COLORS) if colors is None else [n for n in COLORS if n in colors]
    examples: list[Example] = []
    for _ in range(count):
        shape = shapes[int(torch.randint(len(shapes), (), generator=rng))]
        fg_index = int(torch.randint(len(names), (), generator=rng))
        bg_index = (fg_index + 1 + int(torch.randint(len(names) - 1, (), generator=rng))) % len(names)
        fg, bg = names[fg_index], names[bg_index]
        u = torch.rand(3, generator=rng)
        radius = resolution * (0.2 + 0.12 * float(u[0]))
        margin = radius * 1.05
        cx = margin + float(u[1]) * (resolution - 2 * margin)
        cy = margin + float(u[2]) * (resolution - 2 * margin)
        mask = _shape_mask(shape, resolution, cx, cy, radius)
        image = torch.empty(3, resolution, resolution)
        image[:] = torch.tensor(COLORS[bg]).view(3, 1, 1)
        image[:, mask] = torch.tensor(COLORS[fg]).view(3, 1)
        examples.append(Example(image * 2.0 - 1.0, f"a {fg} {shape} on a {bg} background"))
    return examples


def _load_image(path: Path, resolution: int) -> torch.Tensor:
    """Read an image as RGB, resize its shorter side to ``resolution`` and center-crop to a square."""
    try:
        from PIL import Image
    except ImportError as error:  # pragma: no cover - pillow comes with matplotlib
        raise ImportError("reading --train_data_dir needs pillow: pip install pillow") from error
    with Image.open(path) as handle:
        image = handle.convert("RGB")
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
    return data.permute(2, 0, 1).float() / 127.5 - 1.0


def _folder_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_image_folder(folder: str | Path, resolution: int) -> list[Example]:
    """Load a kohya-style training folder.

    Args:
        folder: the folder (``--train_data_dir``): images with same-stem ``.txt`` captions directly inside it,
            and/or ``<repeats>_<class tokens>`` subfolders whose images are repeated ``repeats`` times.
        resolution: side of the square crops.

    Returns:
        The examples (repeats expanded), in sorted path order.

    Raises:
        FileNotFoundError: the folder does not exist or holds no image.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--train_data_dir '{root}' is not a folder")
    sources: list[tuple[Path, int, str]] = [(root, 1, "")]
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        match = _REPEATS_DIR.match(sub.name)
        if match:
            sources.append((sub, int(match.group(1)), match.group(2).strip()))
        else:
            logger.warning("skipping '%s': kohya subfolders are named <repeats>_<class tokens>, e.g. 10_sks dog", sub)
    examples: list[Example] = []
    for path, repeats, class_tokens in sources:
        for image_path in _folder_images(path):
            caption_path = image_path.with_suffix(".txt")
            caption = caption_path.read_text(encoding="utf-8").strip() if caption_path.is_file() else class_tokens
            if not caption:
                logger.warning("'%s' has no caption (.txt) and no class tokens; training it with an empty caption",
                               image_path)
            example = Example(_load_image(image_path, resolution), caption)
            examples.extend([example] * max(repeats, 1))
    if not examples:
        raise FileNotFoundError(
            f"--train_data_dir '{root}' holds no image ({', '.join(IMAGE_SUFFIXES)}), neither directly nor in "
            f"<repeats>_<class tokens> subfolders"
        )
    logger.info("loaded %d training images (repeats included) from %s", len(examples), root)
    return examples
