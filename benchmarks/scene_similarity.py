"""Issue 34's statistic for trained synthetic models: are the background's visual tokens more alike than the objects'?

    .venv/bin/python benchmarks/scene_similarity.py MODEL_DIR [MODEL_DIR ...] [--scenes 100]

Per model, on the first `--scenes` validation scenes of the model's own scene set (`synthetic_scenes` in its
config): the mean pairwise cosine of projected background tokens, of projected object tokens, and the paired
difference (background - object) with a 95 % bootstrap interval over scenes. A difference <= 0 means the background
is no more self-similar than the objects (`pyramiddrop/synthetic/similarity.py` says why that matters).
"""

import argparse
import json
from statistics import fmean

from pyramiddrop.synthetic.data import make_split
from pyramiddrop.synthetic.model import load, scenes_of
from pyramiddrop.synthetic.similarity import background_and_object_similarity
from pyramiddrop.tools.stats import paired_bootstrap_diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="trained synthetic model directories")
    parser.add_argument("--scenes", type=int, default=100, help="validation scenes per model")
    args = parser.parse_args()
    if args.scenes < 2:
        parser.error(f"--scenes {args.scenes}: an interval over scenes needs at least 2")
    for directory in args.models:
        model, processor = load(directory)
        scenes = scenes_of(model)
        background, objects = background_and_object_similarity(
            model, processor, make_split("validation", args.scenes, scenes)
        )
        difference, low, high = paired_bootstrap_diff(background, objects)
        row = {
            "model": directory,
            "scenes": scenes,
            "n": args.scenes,
            "background": round(fmean(background), 3),
            "objects": round(fmean(objects), 3),
            "difference": round(difference, 3),
            "interval": [round(low, 3), round(high, 3)],
        }
        print(json.dumps(row))


if __name__ == "__main__":
    main()
