"""`pdrop show`: draw the visual tokens each stage keeps over the image (or a video's frames)."""

from __future__ import annotations

import argparse
import dataclasses

from pyramiddrop.cli import common
from pyramiddrop.cli.common import UsageError
from pyramiddrop.cli.numbers import POSITIVE


def add_parser(commands, parents: list[argparse.ArgumentParser]) -> None:
    show = commands.add_parser(
        "show", parents=parents, help="draw the kept visual tokens of each stage over the image or video"
    )
    source = show.add_mutually_exclusive_group(required=True)
    source.add_argument("--image")
    source.add_argument("--video", help="an animated image (GIF, APNG, WebP) or a folder of frame images")
    show.add_argument("--frames", type=POSITIVE, default=8, help="frames sampled evenly from --video")
    show.add_argument(
        "--video-pool", choices=["sample", "frame"], default="sample", help="rank all frames together or per frame"
    )
    show.add_argument("--prompt", required=True)
    show.add_argument("--out", default="kept_tokens.png")
    common.add_drop_arguments(show)
    show.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    if args.no_drop:
        raise UsageError("argument --no-drop: there is nothing to show without dropping; remove --no-drop")
    image = None if args.video else common.open_image_argument("--image", args.image)
    from PIL import UnidentifiedImageError

    from pyramiddrop.api import apply_pyramid_drop
    from pyramiddrop.tools.inputs import build_video_inputs, open_video_frames
    from pyramiddrop.tools.show import show_kept_tokens, show_video_kept_tokens

    if args.video:
        try:
            frames = open_video_frames(args.video, args.frames)
        except UnidentifiedImageError as error:
            raise UsageError(
                f"argument --video: {args.video} holds no frames PIL can read ({error}); give an animated image "
                "(GIF, APNG, WebP) or a folder of frame images"
            ) from error
    config = common.drop_config_from_args(
        args, common.model_depth(args)
    )  # checked against the depth before the weights load
    processor, model = common.load(args)
    if args.video:
        config = dataclasses.replace(config, video_pool=args.video_pool)
        try:
            inputs = build_video_inputs(processor, frames, args.prompt)
        except ValueError as error:
            raise UsageError(f"argument --video: {error}") from error
        apply_pyramid_drop(model, config)
        counts = show_video_kept_tokens(model, inputs, frames, args.out)
        print(f"kept tokens per stage and frame: {counts}; wrote {args.out}")
        return
    apply_pyramid_drop(model, config)
    counts = show_kept_tokens(model, processor, image, args.prompt, args.out)
    print(f"kept tokens per stage: {counts}; wrote {args.out}")
