"""What a synthetic scene is, how it is built to fit an answer and how it is drawn: objects on a flat shade ("shapes")
or on clutter ("cluttered", "cluttered-144").

The scene sets share one generator (`data.py`). `shapes` is the shipped model's: a 192 px canvas, a 3x3 grid of
64 px cells, a flat grey background, so background patches are near-duplicates of each other. `cluttered` (issue 34)
is a 256 px canvas in a 4x4 grid (256 visual tokens) whose background is a Voronoi mosaic of textured regions in
six muted hues under a shading gradient, crossed by thin grey marks that no question is about, and every object
carries a small digit glyph inside one 16 px patch: background patches differ from each other about as much as
object patches do, and there is something small to read. `cluttered-144` is the same on the 192 px canvas and
3x3 grid (144 visual tokens).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "white": (235, 235, 235),
}
# The background's hues: muted, and far from every object colour, so "the tint behind" never reads as an object.
HUES = {
    "moss": (95, 115, 55),
    "slate": (70, 85, 135),
    "rust": (140, 75, 50),
    "plum": (115, 55, 100),
    "sand": (155, 140, 100),
    "teal": (40, 120, 110),
}
TEXTURES = ("stripes", "checks", "blocks", "dots")
PATCH = 16  # the vision tower's patch side, px; a glyph sits inside one patch
GLYPH_COLOR = (15, 15, 15)
SURROUND_MARGIN = 6  # px around an object's box that the tint question is about
# 3x5 bitmaps of the digits (rows top to bottom), drawn at 2x: 6 x 10 px, inside one 16 px patch with room to spare
DIGITS = (
    ("111", "101", "101", "101", "111"),
    ("010", "110", "010", "010", "111"),
    ("111", "001", "111", "100", "111"),
    ("111", "001", "111", "001", "111"),
    ("101", "101", "111", "001", "001"),
    ("111", "100", "111", "001", "111"),
    ("111", "100", "111", "101", "111"),
    ("111", "001", "010", "010", "010"),
    ("111", "101", "111", "101", "111"),
    ("111", "101", "111", "001", "111"),
)
GLYPH_SCALE = 2
GLYPH_SIZE = (3 * GLYPH_SCALE, 5 * GLYPH_SCALE)  # width, height
MIN_SIZE, MAX_SIZE = 36, 52  # 3x3 to 4x4 patches of 16 px: a small region, but more than a patch or two


@dataclass(frozen=True)
class SceneSet:
    """A scene family: canvas, grid and the question types asked about it."""

    name: str
    image_size: int
    grid: int
    question_types: tuple[str, ...]
    cluttered: bool

    @property
    def cell(self) -> int:
        return self.image_size // self.grid

    @property
    def visual_tokens(self) -> int:
        return (self.image_size // PATCH) ** 2


SCENE_SETS = {
    "shapes": SceneSet("shapes", 192, 3, ("color", "shape", "exists", "count"), cluttered=False),
    "cluttered": SceneSet(
        "cluttered", 256, 4, ("color", "shape", "exists", "count", "reading", "tint"), cluttered=True
    ),
    # the same scenes on the shapes set's canvas: 144 visual tokens, for recipes that 256 tokens make too slow
    "cluttered-144": SceneSet(
        "cluttered-144", 192, 3, ("color", "shape", "exists", "count", "reading", "tint"), cluttered=True
    ),
}


def scene_set(name: str) -> SceneSet:
    """The scene set called `name`, or an error listing the known ones."""
    if name not in SCENE_SETS:
        raise ValueError(f"unknown scene set {name!r}; choose from {', '.join(SCENE_SETS)}")
    return SCENE_SETS[name]


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: int  # side of the bounding square, px
    row: int
    col: int
    cx: int
    cy: int
    digit: int | None = None  # the glyph drawn on it (cluttered scenes)
    glyph: tuple[int, int] | None = None  # the glyph's top-left pixel, inside one patch that lies on the object

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), inclusive."""
        half = self.size // 2
        return (
            self.cx - half,
            self.cy - half,
            self.cx - half + self.size - 1,
            self.cy - half + self.size - 1,
        )

    @property
    def glyph_patch(self) -> tuple[int, int] | None:
        """(patch row, patch column) of the patch holding the glyph."""
        return None if self.glyph is None else (self.glyph[1] // PATCH, self.glyph[0] // PATCH)


@dataclass(frozen=True)
class Region:
    """A Voronoi site of the cluttered background: every pixel nearer to (x, y) than to other sites is its."""

    x: int
    y: int
    hue: str
    texture: str

    @property
    def material(self) -> int:
        return list(HUES).index(self.hue) * len(TEXTURES) + TEXTURES.index(self.texture)


@dataclass(frozen=True)
class Mark:
    """A thin grey line on the background (clutter no question is about)."""

    x0: int
    y0: int
    x1: int
    y1: int
    grey: int
    width: int


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]  # the flat shade ("shapes"); unused under a cluttered background
    scenes: str = "shapes"
    regions: tuple[Region, ...] = ()
    marks: tuple[Mark, ...] = ()
    shading: tuple[float, float] = (0.0, 0.0)  # gradient angle (radians) and strength

    @property
    def size(self) -> int:
        return scene_set(self.scenes).image_size


# ---------------------------------------------------------------- drawing


def render(scene: Scene) -> Image.Image:
    """Draw a scene; no anti-aliasing, so each object's pixels are exactly its colour (the glyph's excepted)."""
    if scene.regions:
        image = Image.fromarray(background_pixels(scene))
    else:
        image = Image.new("RGB", (scene.size, scene.size), scene.background)
    draw = ImageDraw.Draw(image)
    for mark in scene.marks:
        draw.line((mark.x0, mark.y0, mark.x1, mark.y1), fill=(mark.grey,) * 3, width=mark.width)
    for obj in scene.objects:
        draw_object(draw, obj, COLORS[obj.color])
        if obj.glyph is not None:
            draw_glyph(draw, obj.digit, obj.glyph)
    return image


def object_mask(scene: Scene) -> Image.Image:
    """An 'L' image holding 1 + the object's index on its pixels and 0 on the background."""
    mask = Image.new("L", (scene.size, scene.size), 0)
    draw = ImageDraw.Draw(mask)
    for index, obj in enumerate(scene.objects):
        draw_object(draw, obj, index + 1)
    return mask


def draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, fill) -> None:
    x0, y0, x1, y1 = obj.bbox
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:  # apex up; the bbox centre lies inside
        draw.polygon([(obj.cx, y0), (x1, y1), (x0, y1)], fill=fill)


def draw_glyph(draw: ImageDraw.ImageDraw, digit: int, origin: tuple[int, int]) -> None:
    for row, bits in enumerate(DIGITS[digit]):
        for col, bit in enumerate(bits):
            if bit == "1":
                x, y = origin[0] + col * GLYPH_SCALE, origin[1] + row * GLYPH_SCALE
                draw.rectangle((x, y, x + GLYPH_SCALE - 1, y + GLYPH_SCALE - 1), fill=GLYPH_COLOR)


def region_index(scene: Scene, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Index of the region owning each pixel (nearest site, ties to the lower index)."""
    sites = np.array([(r.x, r.y) for r in scene.regions])
    distance = (xs[..., None] - sites[:, 0]) ** 2 + (ys[..., None] - sites[:, 1]) ** 2
    return distance.argmin(-1)


def background_pixels(scene: Scene) -> np.ndarray:
    """(size, size, 3) uint8: each region's hue, lightened and darkened by its texture, under the shading."""
    size = scene.size
    ys, xs = np.mgrid[0:size, 0:size]
    owner = region_index(scene, xs, ys)
    patterns = {
        "stripes": ((xs + ys) // 4) % 2,
        "checks": (xs // 6 + ys // 6) % 2,
        "blocks": ((xs // 12) % 2) * ((ys // 8) % 2),
        "dots": ((xs % 6) < 2) & ((ys % 6) < 2),
    }
    hue = np.array([HUES[r.hue] for r in scene.regions], dtype=np.float32)[owner]
    texture = np.zeros((size, size), dtype=np.float32)
    for index, region in enumerate(scene.regions):
        texture = np.where(owner == index, patterns[region.texture], texture)
    angle, strength = scene.shading
    ramp = (xs * np.cos(angle) + ys * np.sin(angle)) / size
    light = (1 + 0.2 * (texture - 0.5)) * (1 + strength * (ramp - ramp.mean()))
    return np.clip(hue * light[..., None], 0, 255).astype(np.uint8)


def surround_box(obj: SceneObject, size: int | None = None) -> tuple[int, int, int, int]:
    """The object's box grown by `SURROUND_MARGIN` (inclusive; clipped to a `size` px canvas if given): what "the
    tint behind" it is about."""
    x0, y0, x1, y1 = obj.bbox
    box = (x0 - SURROUND_MARGIN, y0 - SURROUND_MARGIN, x1 + SURROUND_MARGIN, y1 + SURROUND_MARGIN)
    if size is None:
        return box
    return (max(0, box[0]), max(0, box[1]), min(size - 1, box[2]), min(size - 1, box[3]))


def surround_hue(scene: Scene, obj: SceneObject) -> str | None:
    """The hue of the one region holding the object's whole surround box, or None when it straddles regions."""
    x0, y0, x1, y1 = surround_box(obj, scene.size)
    ys, xs = np.mgrid[y0 : y1 + 1, x0 : x1 + 1]
    owners = np.unique(region_index(scene, xs, ys))
    return scene.regions[owners[0]].hue if len(owners) == 1 else None


def clear_around(regions: list[Region], obj: SceneObject, hue: str, texture: str) -> list[Region]:
    """`regions` with a new region of `hue` at the object's centre and no other site within twice the surround
    box's half-diagonal: every pixel of the box is then nearer to the new site than to any other."""
    x0, y0, x1, y1 = surround_box(obj)
    reach = (((x1 - x0) / 2) ** 2 + ((y1 - y0) / 2) ** 2) ** 0.5 + 1  # the object's centre is the box's within 1 px
    kept = [r for r in regions if (r.x - obj.cx) ** 2 + (r.y - obj.cy) ** 2 > (2 * reach) ** 2]
    return [Region(obj.cx, obj.cy, hue, texture), *kept]


def glyph_patches(obj: SceneObject, size: int) -> list[tuple[int, int]]:
    """Top-left pixels of the grid patches lying wholly on the object (where its glyph may go)."""
    mask = Image.new("1", (size, size), 0)
    draw_object(ImageDraw.Draw(mask), obj, 1)
    pixels = np.array(mask, dtype=bool)
    x0, y0, x1, y1 = obj.bbox
    found = []
    for top in range(max(0, y0 // PATCH * PATCH), min(size, y1 + 1), PATCH):
        for left in range(max(0, x0 // PATCH * PATCH), min(size, x1 + 1), PATCH):
            if top + PATCH <= size and left + PATCH <= size and pixels[top : top + PATCH, left : left + PATCH].all():
                found.append((left, top))
    return found


# ---------------------------------------------------------------- building a scene to fit an answer


def place_object(rng: random.Random, spec: SceneSet, shape: str, color: str, cell: int) -> SceneObject:
    """An object inside grid cell `cell`; on cluttered scenes with a digit glyph inside a patch wholly on it (the
    size and position are redrawn until such a patch exists)."""
    row, col = divmod(cell, spec.grid)
    for _ in range(200):
        size = rng.randint(MIN_SIZE, MAX_SIZE)
        low, high = size // 2 + 4, spec.cell - (size - size // 2) - 4
        cx, cy = col * spec.cell + rng.randint(low, high), row * spec.cell + rng.randint(low, high)
        obj = SceneObject(shape, color, size, row, col, cx, cy)
        if not spec.cluttered:
            return obj
        patches = glyph_patches(obj, spec.image_size)
        if patches:
            left, top = rng.choice(patches)
            dx, dy = rng.randint(1, PATCH - 1 - GLYPH_SIZE[0]), rng.randint(1, PATCH - 1 - GLYPH_SIZE[1])
            return replace(obj, digit=rng.randrange(10), glyph=(left + dx, top + dy))
    raise RuntimeError(f"no patch fits wholly on a {shape} in cell {cell}")  # never seen: sizes >= 36 px


class SceneBuilder:
    """Objects in distinct cells with distinct (colour, shape) pairs."""

    def __init__(self, rng: random.Random, spec: SceneSet, scene_objects: tuple[int, int] = (3, 6)):
        self.rng, self.spec, self.scene_objects = rng, spec, scene_objects
        self.objects: list[SceneObject] = []
        self.free = list(range(spec.grid * spec.grid))
        self.surround: tuple[SceneObject, str] | None = None  # (object, hue) of a tint question
        rng.shuffle(self.free)

    def add(self, shape: str, color: str, cell: int | None = None, digit: int | None = None) -> SceneObject:
        cell = self.free[0] if cell is None else cell
        self.free.remove(cell)
        obj = place_object(self.rng, self.spec, shape, color, cell)
        if digit is not None:
            obj = replace(obj, digit=digit)
        self.objects.append(obj)
        return obj

    def scene_size(self, at_least: int = 0) -> int:
        """How many objects the scene gets, drawn from `scene_objects` (raised to `at_least`)."""
        low, high = self.scene_objects
        return self.rng.randint(max(low, at_least), max(high, at_least))

    def fill(self, total: int, allowed=lambda shape, color: True, keep_free: tuple[int, ...] = ()) -> None:
        used = {(o.shape, o.color) for o in self.objects}
        pairs = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in used and allowed(s, c)]
        self.rng.shuffle(pairs)
        cells = [cell for cell in self.free if cell not in keep_free]
        while len(self.objects) < total and pairs and cells:
            shape, color = pairs.pop()
            self.add(shape, color, cells.pop())

    def scene(self) -> Scene:
        if not self.spec.cluttered:
            shade = self.rng.randint(25, 70)
            return Scene(tuple(self.objects), (shade, shade, shade))
        rng, size = self.rng, self.spec.image_size
        regions = [
            Region(rng.randrange(size), rng.randrange(size), rng.choice(list(HUES)), rng.choice(TEXTURES))
            for _ in range(rng.randint(12, 20))
        ]
        if self.surround is not None:
            obj, hue = self.surround
            regions = clear_around(regions, obj, hue, rng.choice(TEXTURES))
        marks = []
        for _ in range(rng.randint(12, 24)):
            x0, y0 = rng.randrange(size), rng.randrange(size)
            length, angle = rng.randint(6, 20), rng.uniform(0, 2 * math.pi)
            x1, y1 = round(x0 + length * math.cos(angle)), round(y0 + length * math.sin(angle))
            marks.append(Mark(x0, y0, x1, y1, rng.randint(90, 185), rng.randint(1, 2)))
        shading = (rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.3))
        return Scene(tuple(self.objects), (0, 0, 0), self.spec.name, tuple(regions), tuple(marks), shading)
