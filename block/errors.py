"""Exceptions raised by the block layer.

Every message names the image file and, for refusals, the feature, so that a
user reading a migration log knows which disk is at fault and why.
"""

from __future__ import annotations


class BlockError(Exception):
    """Base class of every error the block layer raises."""


class ImageInUse(BlockError):
    """Another process (or another open of this process) holds the image for writing."""


class UnsupportedFeature(BlockError):
    """The image uses a format feature this driver refuses (nothing was written)."""


class ImageInactive(BlockError):
    """A write or flush was issued on an inactive image (after inactivate(), before activate())."""


class ReadOnlyImage(BlockError):
    """A write was issued on an image opened read-only."""


class CorruptImage(BlockError):
    """The image's metadata is malformed or inconsistent."""


class ImageClosed(BlockError):
    """The image was used after close()."""


class ImageNotFound(BlockError, FileNotFoundError):
    """The image file (or a backing file) does not exist."""


class OutOfRange(BlockError, ValueError):
    """A request lies (partly) outside the virtual disk."""
