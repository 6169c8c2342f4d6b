""" Shapes: a small, deterministic, learnable image-classification dataset generated on the spot

The demo needs a dataset that is there without a download, is learnable in minutes on a laptop CPU and still needs
what a ConvMixer does (spatial mixing to tell a shape by its outline, not a pixel statistic). Every image is one
filled shape of random colour, size, position and rotation on a random, noisy background of another colour; the
class is the shape only, so colour and position carry no label information.

The output is a plain ImageFolder (``root/train/<class>/*.png``, ``root/val/<class>/*.png``) that timm's
``create_dataset('', root, split=...)`` and ``train.py --data-dir root`` read as they would any real dataset.
Generation is seeded (Python's ``random``), so the same arguments give byte-identical files.
"""
import json
import math
import os
import random
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFilter

from .atomic import atomic_write_dir

__all__ = ['CLASSES', 'draw_shape', 'generate', 'ensure_dataset']

CLASSES: Tuple[str, ...] = ('circle', 'square', 'triangle', 'cross', 'star', 'ring')

_SPEC_FILE = 'shapes.json'
_SUPERSAMPLE = 4  # draw large, then downsample: anti-aliased outlines at any output size


def _regular_polygon(cx: float, cy: float, r: float, n: int, rot: float) -> List[Tuple[float, float]]:
    return [(cx + r * math.cos(rot + 2 * math.pi * i / n), cy + r * math.sin(rot + 2 * math.pi * i / n))
            for i in range(n)]


def _star(cx: float, cy: float, r: float, rot: float, points: int = 5) -> List[Tuple[float, float]]:
    out = []
    for i in range(2 * points):
        rr = r if i % 2 == 0 else r * 0.42
        a = rot + math.pi * i / points
        out.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return out


def _cross(cx: float, cy: float, r: float, rot: float) -> List[Tuple[float, float]]:
    w = r * 0.36  # half width of each bar
    pts = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _colour(rng: random.Random, avoid: Optional[Sequence[int]] = None) -> Tuple[int, int, int]:
    """A random colour at least some distance from ``avoid`` so the shape is always visible."""
    while True:
        col = tuple(rng.randrange(256) for _ in range(3))
        if avoid is None or sum(abs(a - b) for a, b in zip(col, avoid)) > 180:
            return col


def draw_shape(shape: str, rng: random.Random, size: int = 32) -> Image.Image:
    """One RGB image of ``shape`` with random colours, scale, position, rotation and background noise."""
    if shape not in CLASSES:
        raise ValueError(f'unknown shape {shape!r}; expected one of {CLASSES}')
    big = size * _SUPERSAMPLE
    bg = _colour(rng)
    fg = _colour(rng, avoid=bg)
    img = Image.new('RGB', (big, big), bg)
    draw = ImageDraw.Draw(img)
    r = big * rng.uniform(0.22, 0.38)
    cx = rng.uniform(r, big - r)
    cy = rng.uniform(r, big - r)
    rot = rng.uniform(0, 2 * math.pi)
    if shape == 'circle':
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == 'ring':
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        ri = r * 0.55
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=bg)
    elif shape == 'square':
        draw.polygon(_regular_polygon(cx, cy, r * 1.1, 4, rot), fill=fg)
    elif shape == 'triangle':
        draw.polygon(_regular_polygon(cx, cy, r * 1.15, 3, rot), fill=fg)
    elif shape == 'cross':
        draw.polygon(_cross(cx, cy, r * 1.1, rot), fill=fg)
    else:
        draw.polygon(_star(cx, cy, r * 1.2, rot), fill=fg)
    img = img.resize((size, size), Image.LANCZOS)
    # per-pixel noise (seeded) so the background is not a flat colour
    noise = Image.frombytes('L', (size, size), bytes(rng.randrange(48) for _ in range(size * size)))
    noise = noise.filter(ImageFilter.GaussianBlur(0.5)).convert('RGB')
    return Image.blend(img, noise, 0.15)


def _spec(
        train_per_class: int = 200,
        val_per_class: int = 50,
        image_size: int = 32,
        seed: int = 0,
        classes: Sequence[str] = CLASSES,
) -> Dict[str, object]:
    """What identifies a generated dataset (stored as ``shapes.json``; a match means no regeneration)."""
    return dict(
        classes=list(classes), train_per_class=int(train_per_class), val_per_class=int(val_per_class),
        image_size=int(image_size), seed=int(seed), version=1)


def generate(root: str, **kwargs) -> Dict[str, object]:
    """Write ``root/train`` and ``root/val`` ImageFolders; returns the spec written to ``root/shapes.json``.

    Keyword arguments: ``train_per_class`` (200), ``val_per_class`` (50), ``image_size`` (32), ``seed`` (0),
    ``classes`` (all of :data:`CLASSES`). Written atomically (:func:`.atomic.atomic_write_dir`), so an interrupted run
    never leaves a half-written dataset that a later run would take for complete, nor a previous one half-removed.
    """
    spec = _spec(**kwargs)
    root = os.path.abspath(root)
    if os.path.exists(root) and not os.path.isfile(os.path.join(root, _SPEC_FILE)):
        raise FileExistsError(f'{root} exists and is no generated shapes dataset (no {_SPEC_FILE}); refusing to '
                              'replace it: move it, or choose another --output')

    def write(tmp: str) -> None:
        for split, per_class, split_seed in (
                ('train', spec['train_per_class'], spec['seed']), ('val', spec['val_per_class'], spec['seed'] + 1)):
            rng = random.Random(f'shapes-{split_seed}')
            for cls in spec['classes']:
                os.makedirs(os.path.join(tmp, split, cls), exist_ok=True)
            for i in range(per_class):
                for cls in spec['classes']:
                    draw_shape(cls, rng, spec['image_size']).save(os.path.join(tmp, split, cls, f'{i:05d}.png'))
        with open(os.path.join(tmp, _SPEC_FILE), 'w') as f:
            json.dump(spec, f, indent=1)

    atomic_write_dir(root, write, replace=True)
    return spec


def ensure_dataset(root: str, **kwargs) -> Tuple[Dict[str, object], bool]:
    """Generate the dataset unless ``root`` already holds one made with the same arguments.

    Returns the spec and whether it was (re)generated.
    """
    spec_path = os.path.join(root, _SPEC_FILE)
    if os.path.isfile(spec_path):
        with open(spec_path) as f:
            if json.load(f) == _spec(**kwargs):
                return _spec(**kwargs), False
    return generate(root, **kwargs), True
