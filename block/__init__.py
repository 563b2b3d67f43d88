"""livemig block layer: raw and qcow2 images with QEMU-compatible locks.

Stands alone (imports nothing from actors/, protocol/ or machine/).  See
docs/block.md.
"""

from .api import FORMATS, create_image, open_image, probe_format
from .errors import (
    BlockError,
    CorruptImage,
    ImageClosed,
    ImageInactive,
    ImageInUse,
    ImageNotFound,
    OutOfRange,
    ReadOnlyImage,
    UnsupportedFeature,
)
from .image import Image
from .qcow2 import Qcow2Image
from .raw import RawImage

__all__ = [
    "FORMATS",
    "BlockError",
    "CorruptImage",
    "Image",
    "ImageClosed",
    "ImageInUse",
    "ImageInactive",
    "ImageNotFound",
    "OutOfRange",
    "Qcow2Image",
    "RawImage",
    "ReadOnlyImage",
    "UnsupportedFeature",
    "create_image",
    "open_image",
    "probe_format",
]
