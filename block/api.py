"""Opening, probing and creating images: the entry points of the block layer."""

from __future__ import annotations

import os

from .errors import BlockError, ImageNotFound, UnsupportedFeature
from .image import Image
from .qcow2 import Qcow2Image, create_qcow2
from .raw import RawImage, create_raw

FORMATS = ("raw", "qcow2")

# Magics of formats we recognise but do not drive, so they are not silently read as raw.
_OTHER_MAGICS = [
    (b"QFI\xfb", "qcow2"),
    (b"QED\x00", "qed"),
    (b"KDMV", "vmdk"),
    (b"<<< ", "vdi"),
    (b"vhdxfile", "vhdx"),
    (b"conectix", "vpc"),
    (b"LUKS\xba\xbe", "luks"),
]


def probe_format(path: str) -> str:
    """Guess the format from the file's magic; anything unrecognised is raw."""
    with open(path, "rb") as f:
        head = f.read(8)
    for magic, name in _OTHER_MAGICS:
        if head.startswith(magic):
            return name
    return "raw"


def open_image(path: str | os.PathLike, format: str | None = None, read_only: bool = False,
               inactive: bool = False, **options: int) -> Image:
    """Open an image.

    format: "raw" or "qcow2"; probed from the file when None.
    read_only: never write, never lock.
    inactive: read metadata now but stay inactive (no lock, writes refused) until
        activate(), as a migration destination does.
    options (qcow2): l2_cache_size, refcount_cache_size in bytes.
    """
    path = os.fspath(path)
    try:
        fmt = format or probe_format(path)
    except FileNotFoundError as e:
        raise ImageNotFound(f"{path}: no such image file") from e
    except OSError as e:
        raise BlockError(f"{path}: cannot open: {e.strerror}") from e
    if fmt not in FORMATS:
        raise UnsupportedFeature(f"{path}: image format {fmt!r} is not supported "
                                 f"(supported: {', '.join(FORMATS)})")
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as e:
        raise ImageNotFound(f"{path}: no such image file") from e
    except OSError as e:
        raise BlockError(f"{path}: cannot open: {e.strerror}") from e
    img: Image
    try:
        if fmt == "qcow2":
            img = Qcow2Image(path, fd, read_only, inactive, **options)
        else:
            if options:
                raise BlockError(f"{path}: raw images take no options ({', '.join(options)})")
            img = RawImage(path, fd, read_only, inactive)
    except BaseException:
        os.close(fd)
        raise
    img._open()
    return img


def create_image(path: str | os.PathLike, size: int | None, format: str = "qcow2",
                 cluster_size: int = 65536, backing: str | None = None,
                 backing_format: str | None = None, *, compat: str = "1.1",
                 refcount_bits: int = 16) -> None:
    """Create (or truncate) an image.

    size may be None for a qcow2 overlay: it then takes the backing image's size.
    backing is stored as given; a relative path is relative to the new image's
    directory.  backing_format is probed when None and stored in the header.
    """
    path = os.fspath(path)
    if format == "raw":
        if backing:
            raise BlockError(f"{path}: raw images cannot have a backing file")
        if size is None or size < 0:
            raise BlockError(f"{path}: raw images need a size")
        create_raw(path, size)
        return
    if format != "qcow2":
        raise UnsupportedFeature(f"{path}: cannot create images of format {format!r}")
    if backing:
        full = backing if os.path.isabs(backing) else \
            os.path.join(os.path.dirname(os.path.abspath(path)), backing)
        if not os.path.exists(full):
            raise ImageNotFound(f"{path}: backing file {full} does not exist")
        backing_format = backing_format or probe_format(full)
        if size is None:
            with open_image(full, format=backing_format, read_only=True) as b:
                size = b.size
    if size is None or size < 0:
        raise BlockError(f"{path}: a size is needed (or a backing file to take it from)")
    create_qcow2(path, size, cluster_size, backing, backing_format, compat=compat,
                 refcount_bits=refcount_bits)
