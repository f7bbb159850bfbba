"""Make `import torchvision` work on a CPU-only torch.

PyPI's torchvision wheels are built against CUDA. Paired with a CPU build of torch (the pin in
constraints.txt installs one on machines without a GPU), torchvision's compiled extension fails to
load, and `import torchvision` then dies in its meta registrations with
`RuntimeError: operator torchvision::nms does not exist`. open_clip and Lightning (through
torchmetrics) import torchvision, so vdm could not start.

vdm needs only torchvision's pure-Python parts (transforms). When, and only when, torch is a CPU build
and torchvision's extension cannot be loaded, we declare the two operator schemas that the meta
registrations look up, so the import goes through. On a CUDA torch, or where the extension loads,
this does nothing.
"""

import importlib.util
import logging
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # keeps the fragment registered for the life of the process


def _extension_path() -> Path | None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        for candidate in sorted(Path(location).glob("_C*.so")) + sorted(Path(location).glob("_C*.pyd")):
            return candidate
    return None


def ensure_torchvision_importable() -> bool:
    """Declare the missing schemas if needed. Returns True when it did."""
    global _library
    if _library is not None or "torchvision" in sys.modules or torch.version.cuda is not None:
        return False
    extension = _extension_path()
    if extension is None:  # torchvision is not installed: nothing to fix
        return False
    try:
        torch.ops.load_library(str(extension))
        return False  # a CPU-compatible torchvision: its own schemas are registered now
    except OSError:
        pass
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        _library.define(schema)
    log.debug("declared torchvision operator schemas for a CPU-only torch (extension %s unusable)", extension)
    return True
