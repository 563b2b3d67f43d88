"""The qcow2 driver: the image (image.py), its L1 and L2 tables (l2cache.py), its
refcounts and allocator (refcounts.py), creation (create.py) and the on-disk
format (format.py)."""

from .create import create_qcow2
from .image import Qcow2Image

__all__ = ["Qcow2Image", "create_qcow2"]
