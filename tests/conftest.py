"""Loaded first by pytest in every process (xdist's controller too): vdm before anything imports torchvision, so
torchvision's CUDA-built operators are declared on a CPU-only torch (vdm/_torchvision_compat.py). A warning a worker
sends back names its category's module, and the controller imports it to rebuild the warning."""

import vdm  # noqa: F401
