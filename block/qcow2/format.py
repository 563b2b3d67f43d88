"""qcow2 on-disk format: constants, header parsing and packing, refcount codecs.

Pure functions and data only; the driver and its caches live beside it in this package.
Layout facts follow the public qcow2 specification (docs/interop/qcow2.rst).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from ..errors import CorruptImage, UnsupportedFeature

MAGIC = 0x514649FB
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21  # 2 MiB, the largest QEMU handles

# L1/L2 entry bits
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1
OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1_RESERVED = 0x7F000000000001FF
L2_RESERVED = 0x3F000000000001FE
RT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00

# Feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
KNOWN_INCOMPAT = INCOMPAT_DIRTY | INCOMPAT_CORRUPT  # the ones we can open with
COMPAT_LAZY_REFCOUNTS = 1 << 0

INCOMPAT_NAMES = {
    0: "dirty bit",
    1: "corrupt bit",
    2: "external data file",
    3: "compression type (non-deflate compression, e.g. zstd)",
    4: "extended L2 entries (subclusters)",
}

# Header extension types
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

V2_HEADER_LEN = 72
V3_MIN_HEADER_LEN = 104
V3_HEADER_LEN = 112  # what QEMU writes: 104 + compression_type byte + 7 bytes padding

_FIXED = struct.Struct(">IIQIIQIIQQIIQ")  # the 72 bytes every version has
_V3 = struct.Struct(">QQQII")  # bytes 72..103

# Feature name table we write into images we create (names are ours).
FEATURE_TABLE = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
]


def pack_feature_table(entries: list[tuple[int, int, str]]) -> bytes:
    return b"".join(struct.pack(">BB46s", t, b, n.encode()) for t, b, n in entries)


def _align8(n: int) -> int:
    return (n + 7) & ~7


@dataclass
class Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LEN
    compression_type: int = 0
    # Bytes of header fields newer than this driver (kept verbatim on rewrite).
    unknown_fields: bytes = b""
    # Every header extension in file order, unknown ones included (kept on rewrite).
    extensions: list[tuple[int, bytes]] = field(default_factory=list)
    backing_file: str | None = None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def backing_format(self) -> str | None:
        for t, d in self.extensions:
            if t == EXT_BACKING_FORMAT:
                return d.decode("utf-8", "replace")
        return None

    def extension(self, etype: int) -> bytes | None:
        for t, d in self.extensions:
            if t == etype:
                return d
        return None

    def feature_name(self, ftype: int, bit: int) -> str:
        table = self.extension(EXT_FEATURE_TABLE)
        if table:
            for i in range(0, len(table) - 47, 48):
                t, b, name = struct.unpack_from(">BB46s", table, i)
                if t == ftype and b == bit:
                    return name.rstrip(b"\0").decode("utf-8", "replace")
        if ftype == 0 and bit in INCOMPAT_NAMES:
            return INCOMPAT_NAMES[bit]
        return f"unknown feature bit {bit}"

    def pack(self) -> bytes:
        """Serialise the header, its extensions and the backing name (cluster 0 content)."""
        out = bytearray(_FIXED.size)
        if self.version >= 3:
            out += _V3.pack(self.incompatible, self.compatible, self.autoclear,
                            self.refcount_order, self.header_length)
            if self.header_length > V3_MIN_HEADER_LEN:
                out += bytes([self.compression_type]) + bytes(7)
                out += self.unknown_fields
            del out[self.header_length:]  # a 104-byte header has no compression byte
            out += bytes(self.header_length - len(out))
        for t, d in self.extensions:
            out += struct.pack(">II", t, len(d)) + d + bytes(_align8(len(d)) - len(d))
        out += struct.pack(">II", EXT_END, 0)
        if self.backing_file:
            name = self.backing_file.encode()
            self.backing_file_offset, self.backing_file_size = len(out), len(name)
            out += name
        else:
            self.backing_file_offset = self.backing_file_size = 0
        _FIXED.pack_into(out, 0, MAGIC, self.version, self.backing_file_offset,
                         self.backing_file_size, self.cluster_bits, self.size, self.crypt_method,
                         self.l1_size, self.l1_table_offset, self.refcount_table_offset,
                         self.refcount_table_clusters, self.nb_snapshots, self.snapshots_offset)
        return bytes(out)


def peek_cluster_bits(buf: bytes, path: str) -> int:
    if len(buf) < _FIXED.size or struct.unpack_from(">I", buf, 0)[0] != MAGIC:
        raise CorruptImage(f"{path}: not a qcow2 image (bad magic)")
    version = struct.unpack_from(">I", buf, 4)[0]
    if version not in (2, 3):
        raise UnsupportedFeature(f"{path}: qcow2 version {version} is not supported "
                                 "(only versions 2 and 3)")
    cb = struct.unpack_from(">I", buf, 20)[0]
    if not MIN_CLUSTER_BITS <= cb <= MAX_CLUSTER_BITS:
        raise UnsupportedFeature(f"{path}: cluster size 2^{cb} is not supported "
                                 "(512 B to 2 MiB)")
    return cb


def parse_header(buf: bytes, path: str) -> Header:
    """Parse cluster 0. Raises for malformed headers; feature policy is the driver's."""
    peek_cluster_bits(buf, path)
    f = _FIXED.unpack_from(buf, 0)
    h = Header(*f[1:])
    cs = h.cluster_size
    buf = buf[:cs]
    if h.version >= 3:
        (h.incompatible, h.compatible, h.autoclear, h.refcount_order,
         h.header_length) = _V3.unpack_from(buf, _FIXED.size)
        if h.header_length < V3_MIN_HEADER_LEN or h.header_length % 8:
            raise CorruptImage(f"{path}: invalid qcow2 header length {h.header_length}")
        if h.header_length > cs:
            raise CorruptImage(f"{path}: qcow2 header is larger than a cluster")
        if h.header_length > V3_MIN_HEADER_LEN:
            h.compression_type = buf[V3_MIN_HEADER_LEN]
        if h.header_length > V3_HEADER_LEN:
            h.unknown_fields = bytes(buf[V3_HEADER_LEN:h.header_length])
        if h.refcount_order > 6:
            raise CorruptImage(f"{path}: invalid refcount order {h.refcount_order}")
        ext_start = h.header_length
    else:
        h.header_length = V2_HEADER_LEN
        ext_start = V2_HEADER_LEN
    # Extensions run until the end marker; a v2 image may have none and no marker at all,
    # in which case they stop where the backing name starts.
    limit = cs
    if h.backing_file_offset:
        limit = min(limit, h.backing_file_offset)
    off = ext_start
    while off + 8 <= limit:
        etype, elen = struct.unpack_from(">II", buf, off)
        if etype == EXT_END:
            break
        if off + 8 + elen > limit:
            raise CorruptImage(f"{path}: qcow2 header extension 0x{etype:08x} overflows the header")
        h.extensions.append((etype, bytes(buf[off + 8:off + 8 + elen])))
        off += 8 + _align8(elen)
    if h.backing_file_offset:
        if h.backing_file_size > 1023 or h.backing_file_offset + h.backing_file_size > cs:
            raise CorruptImage(f"{path}: invalid backing file name location")
        raw = buf[h.backing_file_offset:h.backing_file_offset + h.backing_file_size]
        h.backing_file = raw.decode("utf-8", "replace")
    if h.l1_table_offset % cs or h.refcount_table_offset % cs:
        raise CorruptImage(f"{path}: L1 or refcount table is not cluster aligned")
    if h.refcount_table_clusters == 0:
        raise CorruptImage(f"{path}: image has no refcount table")
    l2_bits = h.cluster_bits - 3
    need_l1 = -(-h.size // (1 << (h.cluster_bits + l2_bits)))
    if h.l1_size < need_l1:
        raise CorruptImage(f"{path}: L1 table ({h.l1_size} entries) is too small for the "
                           f"{h.size}-byte disk")
    if h.l1_size > (32 << 20) // 8:
        raise UnsupportedFeature(f"{path}: L1 table of {h.l1_size} entries is too large")
    return h


# -- refcount block codecs: refcount_bits = 1 << order, 1..64 ---------------------------------
_WIDE = {3: ">u1", 4: ">u2", 5: ">u4", 6: ">u8"}


def decode_refcounts(buf: bytes, order: int) -> np.ndarray:
    """Refcount block bytes -> uint64 array (one value per cluster)."""
    if order >= 3:
        return np.frombuffer(buf, _WIDE[order]).astype(np.uint64)
    bits = 1 << order
    per = 8 // bits
    a = np.frombuffer(buf, np.uint8)
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    v = (a[:, None] >> shifts) & np.uint8((1 << bits) - 1)  # bit 0 is the least significant
    return v.reshape(-1).astype(np.uint64)


def encode_refcounts(values: np.ndarray, order: int) -> bytes:
    if order >= 3:
        return values.astype(_WIDE[order]).tobytes()
    bits = 1 << order
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    v = values.astype(np.uint8).reshape(-1, per) << shifts
    return np.bitwise_or.reduce(v, axis=1).astype(np.uint8).tobytes()


def check_features(h: Header, path: str, for_write: bool) -> None:
    """Refuse what this driver cannot open (or, for_write, cannot write) safely."""
    if h.crypt_method:
        kind = {1: "AES", 2: "LUKS"}.get(h.crypt_method, str(h.crypt_method))
        raise UnsupportedFeature(f"{path}: encrypted qcow2 images ({kind} encryption) "
                                 "are not supported")
    unknown = h.incompatible & ~KNOWN_INCOMPAT
    if unknown:
        names = [h.feature_name(0, b) for b in range(64) if unknown >> b & 1]
        raise UnsupportedFeature(f"{path}: unsupported qcow2 incompatible feature(s): "
                                 f"{', '.join(names)} (bits 0x{unknown:x})")
    if h.extension(EXT_DATA_FILE) is not None:
        raise UnsupportedFeature(f"{path}: external data files are not supported")
    if h.compression_type != 0:
        raise UnsupportedFeature(f"{path}: compression type {h.compression_type} "
                                 "(zstd) is not supported")
    if not for_write:
        return
    if h.incompatible & INCOMPAT_CORRUPT:
        raise CorruptImage(f"{path}: image is marked corrupt (corrupt bit set); "
                           f"run 'qemu-img check -r all {path}' before writing to it")
    if h.incompatible & INCOMPAT_DIRTY and h.extension(EXT_BITMAPS) is not None:
        raise CorruptImage(f"{path}: image is dirty (not closed cleanly) and has "
                           "persistent bitmaps, which this driver cannot account for "
                           f"when rebuilding refcounts; run 'qemu-img check -r all {path}'")
