"""Lets PyPI's CUDA-built torchvision 0.28.0 import next to the CPU build of torch in .venv-vllm.

A workaround for this machine's package index only (docs/development.md, "The vLLM environment"): PyPI has no CPU
build of torchvision, and the CUDA one's compiled ops (`torchvision/_C.so`) need CUDA libraries that the CPU torch
lacks, so its import stops in `torchvision/_meta_registrations.py`, which registers fake kernels for
`torchvision::nms` and `torchvision::qnms` and fails because those operators were never defined. Declaring the two
schemas (copied from torchvision's csrc/ops) before torchvision's first import lets its Python parts load:
transforms, the image and video processors vLLM's LLaVA imports. The compiled ops themselves still raise when
called; nothing on vLLM's LLaVA path calls them. Users with a matching torch/torchvision pair do not need this.

setup-vllm.sh copies this file into .venv-vllm's site-packages as `_pyramiddrop_torchvision_shim.py` with a `.pth`
file that installs the import hook at interpreter start, so vLLM's spawned worker processes get it too. The hook
imports torch only when torchvision is first imported, and declares the schemas only when torchvision's compiled
library cannot be loaded (a working torchvision is left alone).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # kept alive: dropping a torch.library.Library object removes its definitions


def declare_schemas(package_dir: Path | None) -> None:
    """Defines torchvision::nms and ::qnms when torchvision's own `_C` library does not load next to this torch."""
    global _library
    import torch

    compiled = sorted(package_dir.glob("_C*.so")) if package_dir else []
    try:
        for path in compiled:
            torch.ops.load_library(str(path))
        if compiled:
            return
    except OSError:
        pass
    missing = [schema for schema in SCHEMAS if not _exists(torch, schema.split("(", 1)[0])]
    if missing and _library is None:
        _library = torch.library.Library("torchvision", "DEF")
        for schema in missing:
            _library.define(schema)


def _exists(torch, name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
    except RuntimeError:
        return False
    return True


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs declare_schemas() once, just before the first `import torchvision`, then steps aside."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            origin = spec.origin if spec is not None else None
            declare_schemas(Path(origin).parent if origin else None)
        return None


def install() -> None:
    if not any(isinstance(finder, _BeforeTorchvision) for finder in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())
