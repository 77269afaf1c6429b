"""Synthetic visual question answering: small shapes drawn with PIL, one-word answers.

Every question needs the image, and most need one small region of it, so dropping the wrong visual tokens
costs accuracy. Two types name an object by one attribute (its shape, or its colour) and ask for the other, one
by a conjunction ("the red circle", with distractors that share one attribute), and counting needs every
instance of a shape. Scenes are stored as metadata and rendered on demand; an example is fully determined by
`(seed, index)`, so splits are reproducible without storing a single image.

Scenes (`scene.py`): a canvas split into a grid of 64 px cells (3x3 at 192 px for the shipped "shapes" set, 4x4
at 256 px for "cluttered"); each object (circle, square or triangle, 36 to 52 px, one of six colours) sits inside
its own cell, and no two objects share both colour and shape, so "the red circle" always names one object. The
cluttered set adds two types that need small regions: "reading" (the digit on an object) and "tint" (the hue of
the background region around an object). Answers are drawn first and the scene is built to match, which
keeps every answer equally likely within its question type (the question alone gives chance accuracy).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from pyramiddrop.synthetic.scene import (
    COLORS,
    HUES,
    SCENE_SETS,
    SHAPES,
    Scene,
    SceneBuilder,
    SceneObject,
    render,
    scene_set,
    surround_hue,
)
from pyramiddrop.tools.answers import normalize_answer

DEFAULT_SCENES = "shapes"  # the shipped model's scene set
IMAGE_SIZE = SCENE_SETS["shapes"].image_size
GRID = SCENE_SETS["shapes"].grid
CELL = IMAGE_SIZE // GRID
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
CELL_NAMES = (
    ("top left", "top middle", "top right"),
    ("middle left", "center", "middle right"),
    ("bottom left", "bottom middle", "bottom right"),
)
COUNT_WORDS = ("zero", "one", "two", "three", "four")
# Types that name a grid cell or compare two objects' positions ("location", "spatial") were dropped: with the
# answer loss alone they never got off their prior in the recipe's budget (docs/synthetic.md, issue 19)
QUESTION_TYPES = SCENE_SETS["shapes"].question_types
DIGIT_WORDS = tuple(str(digit) for digit in range(10))
ANSWERS = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "exists": ("yes", "no"),
    "count": COUNT_WORDS,
    "reading": DIGIT_WORDS,
    "tint": tuple(HUES),
}
SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}
SPLIT_SIZES = {"validation": 500, "test": 1000}


def cell_name(obj: SceneObject, grid: int) -> str:
    return CELL_NAMES[obj.row][obj.col] if grid == 3 else f"row {obj.row + 1} column {obj.col + 1}"


@dataclass
class Example:
    uid: str
    question: str
    answer: str
    type: str
    scene: Scene
    query: dict = field(default_factory=dict)

    def image(self) -> Image.Image:
        return render(self.scene)

    def to_dict(self) -> dict:
        """JSON-ready metadata (everything but pixels)."""
        data = asdict(self)
        grid = scene_set(self.scene.scenes).grid
        for obj, full in zip(data["scene"]["objects"], self.scene.objects):
            obj["cell"], obj["bbox"] = cell_name(full, grid), list(full.bbox)
        return data


# ---------------------------------------------------------------- generation


def _color_question(rng: random.Random, b: SceneBuilder, color: str) -> tuple[str, dict]:
    shape = rng.choice(SHAPES)
    b.add(shape, color)
    b.fill(b.scene_size(), lambda s, c: s != shape)
    return f"what color is the {shape}?", {"type": "color", "shape": shape}


def _exists_question(rng: random.Random, b: SceneBuilder, answer: str) -> tuple[str, dict]:
    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    if answer == "yes":
        b.add(shape, color)
    # Distractors sharing the colour or the shape force the model to bind both attributes.
    if rng.random() < 0.7:
        b.add(rng.choice([s for s in SHAPES if s != shape]), color)
    if rng.random() < 0.7:
        b.add(shape, rng.choice([c for c in COLORS if c != color]))
    b.fill(b.scene_size(), lambda s, c: (s, c) != (shape, color))
    return f"is there a {color} {shape}?", {"type": "exists", "shape": shape, "color": color}


def _count_question(rng: random.Random, b: SceneBuilder, answer: str) -> tuple[str, dict]:
    shape, count = rng.choice(SHAPES), COUNT_WORDS.index(answer)
    for color in rng.sample(list(COLORS), count):
        b.add(shape, color)
    b.fill(b.scene_size(count), lambda s, c: s != shape)
    return f"how many {PLURALS[shape]} are there?", {"type": "count", "shape": shape}


def _shape_question(rng: random.Random, b: SceneBuilder, answer: str) -> tuple[str, dict]:
    color = rng.choice(list(COLORS))
    b.add(answer, color)
    b.fill(b.scene_size(), lambda s, c: c != color)
    return f"what shape is the {color} object?", {"type": "shape", "color": color}


def _reading_question(rng: random.Random, b: SceneBuilder, answer: str) -> tuple[str, dict]:
    """The named object by colour and shape (unique by construction); its neighbours carry digits too."""
    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    b.add(shape, color, digit=int(answer))
    b.fill(b.scene_size(), lambda s, c: (s, c) != (shape, color))
    return f"what number is on the {color} {shape}?", {"type": "reading", "shape": shape, "color": color}


def _tint_question(rng: random.Random, b: SceneBuilder, answer: str) -> tuple[str, dict]:
    """The named object is set in a region of the answer's hue, which holds its whole surround box."""
    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    b.surround = (b.add(shape, color), answer)
    b.fill(b.scene_size(), lambda s, c: (s, c) != (shape, color))
    return f"what tint is behind the {color} {shape}?", {"type": "tint", "shape": shape, "color": color}


_MAKERS = {
    "color": _color_question,
    "shape": _shape_question,
    "exists": _exists_question,
    "count": _count_question,
    "reading": _reading_question,
    "tint": _tint_question,
}


def make_example(
    seed: int, index: int, scene_objects: tuple[int, int] = (3, 6), scenes: str = DEFAULT_SCENES
) -> Example:
    """Example `index` of the stream `seed` of scene set `scenes`; `scene_objects` bounds the objects per scene
    (training uses smaller scenes first: a curriculum).

    Question types cycle with the index and, within a type, so do the answers: any run of consecutive
    indices is balanced over types and answers. The scene is then drawn at random to fit the answer.
    """
    spec = scene_set(scenes)
    stream = "pyramiddrop-synthetic" if scenes == "shapes" else f"pyramiddrop-synthetic-{scenes}"
    rng = random.Random(f"{stream}:{seed}:{index}")  # str seeds hash with sha512: stable
    types = spec.question_types
    qtype = types[index % len(types)]
    options = ANSWERS[qtype]
    answer = options[(index // len(types)) % len(options)]
    builder = SceneBuilder(rng, spec, scene_objects)
    question, query = _MAKERS[qtype](rng, builder, answer)
    return Example(f"s{seed}-{index:06d}", question, answer, qtype, builder.scene(), query)


def generate(n: int, seed: int, start: int = 0, scenes: str = DEFAULT_SCENES) -> list[Example]:
    """`n` examples of the stream `seed`; any seed other than the split seeds gives a fresh set."""
    return [make_example(seed, index, scenes=scenes) for index in range(start, start + n)]


def make_split(name: str, n: int | None = None, scenes: str = DEFAULT_SCENES) -> list[Example]:
    """The fixed train / validation / test split (validation 500 and test 1000 examples by default)."""
    if name not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {name!r}; choose from {sorted(SPLIT_SEEDS)}")
    if n is None:
        if name not in SPLIT_SIZES:
            raise ValueError("the train split is a stream: give n")
        n = SPLIT_SIZES[name]
    return generate(n, SPLIT_SEEDS[name], scenes=scenes)


# ---------------------------------------------------------------- answers from metadata; prompts, scoring, export


_PATTERNS = [
    (r"what colou?r is the (\w+)", ("shape",), "color"),
    (r"is there an? (\w+) (\w+)", ("color", "shape"), "exists"),
    (r"how many (\w+?)s are there", ("shape",), "count"),
    (r"what shape is the (\w+) object", ("color",), "shape"),
    (r"what number is on the (\w+) (\w+)", ("color", "shape"), "reading"),
    (r"what tint is behind the (\w+) (\w+)", ("color", "shape"), "tint"),
]


def parse_question(question: str) -> dict:
    """Recover the structured query from a question's text (inverse of the templates)."""
    text = question.strip().lower()
    for pattern, names, qtype in _PATTERNS:
        match = re.match(pattern, text)
        if match:
            return {"type": qtype} | dict(zip(names, match.groups()))
    raise ValueError(f"not a synthetic question: {question!r}")


def _unique(scene: Scene, shape: str | None = None, color: str | None = None) -> SceneObject:
    found = [o for o in scene.objects if shape in (None, o.shape) and color in (None, o.color)]
    if len(found) != 1:
        raise ValueError(f"ambiguous reference: {len(found)} objects match {color} {shape}")
    return found[0]


def compute_answer(scene: Scene, query: dict) -> str:
    """The answer implied by the metadata alone; raises if the question would be ambiguous."""
    qtype = query["type"]
    if qtype == "color":
        return _unique(scene, query["shape"]).color
    if qtype == "exists":
        hit = any(o.shape == query["shape"] and o.color == query["color"] for o in scene.objects)
        return "yes" if hit else "no"
    if qtype == "count":
        return COUNT_WORDS[sum(o.shape == query["shape"] for o in scene.objects)]
    if qtype == "shape":
        return _unique(scene, color=query["color"]).shape
    if qtype == "reading":
        obj = _unique(scene, query["shape"], query["color"])
        if obj.digit is None:
            raise ValueError(f"the {query['color']} {query['shape']} carries no digit (a {scene.scenes} scene)")
        return str(obj.digit)
    if qtype == "tint":
        obj = _unique(scene, query["shape"], query["color"])
        hue = surround_hue(scene, obj) if scene.regions else None
        if hue is None:
            raise ValueError(f"no single tint behind the {query['color']} {query['shape']}: it straddles regions")
        return hue
    raise ValueError(f"unknown question type {qtype!r}")


def referenced_objects(scene: Scene, query: dict) -> list[int]:
    """Indices of the objects a question is about (what its answer must look at); empty when there is none."""
    qtype, objects = query["type"], scene.objects

    def matching(shape: str, color: str | None = None) -> list[int]:
        return [i for i, o in enumerate(objects) if o.shape == shape and (color is None or o.color == color)]

    if qtype in ("color", "count"):
        return matching(query["shape"])
    if qtype in ("exists", "reading", "tint"):
        return matching(query["shape"], query["color"])
    if qtype == "shape":
        return [i for i, o in enumerate(objects) if o.color == query["color"]]
    raise ValueError(f"unknown question type {qtype!r}")


def answer_question(scene: Scene, question: str) -> str:
    """Answer a question's text from scene metadata (used to check the generator)."""
    return compute_answer(scene, parse_question(question))


def extra_questions(scene: Scene, seed: int, index: int, k: int) -> list[tuple[str, str, str]]:
    """`k` more (question, answer, type) about the same scene, answered from metadata.

    Training packs them after the balanced first question so the visual tokens are paid for once per several
    answers; their answers are not balanced, which is why evaluation only uses first questions. Tint is asked only
    about objects whose surround lies in one region.
    """
    rng = random.Random(f"pyramiddrop-synthetic-extra:{seed}:{index}")
    objects, types = scene.objects, scene_set(scene.scenes).question_types
    out = []
    while len(out) < k:
        qtype = rng.choice(types)
        obj = rng.choice(objects)
        if qtype == "color":
            if sum(o.shape == obj.shape for o in objects) != 1:
                continue
            question = f"what color is the {obj.shape}?"
        elif qtype == "exists":
            absent = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in {(o.shape, o.color) for o in objects}]
            shape, color = (obj.shape, obj.color) if rng.random() < 0.5 else rng.choice(absent)
            question = f"is there a {color} {shape}?"
        elif qtype == "count":
            shape = rng.choice(SHAPES)
            if sum(o.shape == shape for o in objects) >= len(COUNT_WORDS):
                continue
            question = f"how many {PLURALS[shape]} are there?"
        elif qtype == "shape":
            if sum(o.color == obj.color for o in objects) != 1:
                continue
            question = f"what shape is the {obj.color} object?"
        elif qtype == "reading":
            question = f"what number is on the {obj.color} {obj.shape}?"
        else:  # tint
            if surround_hue(scene, obj) is None:
                continue
            question = f"what tint is behind the {obj.color} {obj.shape}?"
        out.append((question, answer_question(scene, question), qtype))
    return out


def build_prompt(question: str) -> str:
    """The prompt the model was trained on; equals the processor's chat template output."""
    return f"USER: <image>\n{question} ASSISTANT:"


def score_answer(prediction: str, answer: str) -> bool:
    """Exact match after normalisation."""
    return normalize_answer(prediction) == normalize_answer(answer)


def accuracy_by_type(types: list[str], predictions: list[str], answers: list[str]) -> dict[str, float]:
    """Accuracy per question type plus 'overall'."""
    hits: dict[str, list[bool]] = {}
    for qtype, prediction, answer in zip(types, predictions, answers):
        hits.setdefault(qtype, []).append(score_answer(prediction, answer))
    result = {qtype: sum(v) / len(v) for qtype, v in sorted(hits.items())}
    result["overall"] = sum(sum(v) for v in hits.values()) / max(1, sum(len(v) for v in hits.values()))
    return result


def chance_accuracy(types: list[str]) -> float:
    """Expected accuracy of a guesser that knows the question type but not the image."""
    return sum(1 / len(ANSWERS[t]) for t in types) / max(1, len(types))


def export_jsonl(examples: list[Example], directory: str | Path, name: str = "data") -> Path:
    """Write `<name>.jsonl` and `images/<uid>.png`; image paths in the JSONL are relative to the file."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.jsonl"
    with path.open("w") as handle:
        for example in examples:
            image_path = Path("images") / f"{example.uid}.png"
            example.image().save(directory / image_path)
            record = {"image": str(image_path), "question": example.question, "answer": example.answer}
            handle.write(json.dumps(record | {"type": example.type}) + "\n")
    return path


def vocabulary(scenes: str = DEFAULT_SCENES) -> list[str]:
    """Every word a question, answer or prompt about scene set `scenes` can contain, in a fixed order (the
    shapes set's words first, so its tokenizer is unchanged)."""
    words = ["user", ":", "assistant", "?"]
    words += ["what", "color", "is", "the", "there", "a", "an", "how", "many", "are", "shape", "object"]
    words += list(SHAPES) + list(PLURALS.values()) + list(COLORS) + list(COUNT_WORDS)
    words += ["yes", "no"]
    if "reading" in scene_set(scenes).question_types:
        words += ["number", "on", *DIGIT_WORDS]
    if "tint" in scene_set(scenes).question_types:
        words += ["tint", "behind", *HUES]
    return list(dict.fromkeys(words))
