"""Creating qcow2 images."""

from __future__ import annotations

import os

import numpy as np

from ..errors import BlockError
from ..image import pwrite_full
from . import format as F

_U64 = np.uint64


def create_qcow2(path: str, size: int, cluster_size: int = 65536, backing: str | None = None,
                 backing_format: str | None = None, compat: str = "1.1",
                 refcount_bits: int = 16) -> None:
    """Write an empty qcow2 image: header, refcount table and block, then an L1 table."""
    from ..api import open_image  # api imports this module

    if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= 2 << 20:
        raise BlockError(f"{path}: cluster size {cluster_size} must be a power of two "
                         "between 512 and 2097152")
    if compat not in ("0.10", "1.1"):
        raise BlockError(f"{path}: compat must be '0.10' (v2) or '1.1' (v3), not {compat!r}")
    if refcount_bits & (refcount_bits - 1) or not 1 <= refcount_bits <= 64:
        raise BlockError(f"{path}: refcount_bits must be a power of two from 1 to 64")
    version = 3 if compat == "1.1" else 2
    if version == 2 and refcount_bits != 16:
        raise BlockError(f"{path}: qcow2 v2 (compat=0.10) only supports refcount_bits=16")
    cb = cluster_size.bit_length() - 1
    order = refcount_bits.bit_length() - 1
    # Size 0 until the L1 table exists: a header must never promise more than its L1 maps.
    h = F.Header(version=version, backing_file_offset=0, backing_file_size=0, cluster_bits=cb,
                 size=0, crypt_method=0, l1_size=0, l1_table_offset=0,
                 refcount_table_offset=cluster_size, refcount_table_clusters=1,
                 nb_snapshots=0, snapshots_offset=0, refcount_order=order,
                 header_length=F.V3_HEADER_LEN if version == 3 else F.V2_HEADER_LEN)
    if backing:
        h.backing_file = backing
        if backing_format:
            h.extensions.append((F.EXT_BACKING_FORMAT, backing_format.encode()))
    if version == 3:
        h.extensions.append((F.EXT_FEATURE_TABLE, F.pack_feature_table(F.FEATURE_TABLE)))
        if len(h.pack()) > cluster_size:  # the table is optional: drop it to make room
            h.extensions.pop()
    hdr = h.pack()
    if len(hdr) > cluster_size:
        raise BlockError(f"{path}: backing file name is too long for {cluster_size}-byte "
                         "clusters")
    rb = np.zeros(cluster_size * 8 >> order, _U64)
    rb[:3] = 1  # header, refcount table, this refcount block
    rt = np.zeros(cluster_size // 8, _U64)
    rt[0] = 2 * cluster_size
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        pwrite_full(fd, hdr + bytes(cluster_size - len(hdr)), 0)
        pwrite_full(fd, rt.astype(">u8").tobytes(), cluster_size)
        pwrite_full(fd, F.encode_refcounts(rb, order), 2 * cluster_size)
        os.fsync(fd)
    finally:
        os.close(fd)
    # The L1 table goes through the normal allocator, so huge tables that need more
    # refcount blocks (or a bigger refcount table) are handled by the same code.
    need_l1 = max(1, -(-size // (cluster_size * cluster_size // 8)))
    img = open_image(path, format="qcow2")
    try:
        img.grow_l1(need_l1)
        img.resize(size)
    finally:
        img.close()
