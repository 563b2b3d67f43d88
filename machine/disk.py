"""Guest disks: drives opened through the block layer, with a dirty log of
1 MiB chunks that block migration harvests the way RAM's dirty log is."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from livemig.block import create_image, open_image
from livemig.block.image import Image
from livemig.protocol.units import parse_size

CHUNK = 1 << 20  # block migration's unit, as QEMU's BLOCK_SIZE
SECTOR = 512


@dataclass(frozen=True)
class DriveSpec:
    """`file=PATH,format=qcow2|raw,id=NAME[,size=SIZE][,cluster_size=N][,backing=PATH]`;
    size= creates the image when the file does not exist yet."""

    file: str
    id: str
    format: str | None = None
    size: int = 0
    cluster_size: int = 65536
    backing: str | None = None

    @classmethod
    def parse(cls, text: str, index: int = 0) -> DriveSpec:
        values: dict[str, str] = {}
        for item in filter(None, text.split(",")):
            key, eq, val = item.partition("=")
            if not eq:
                raise ValueError(f"drive option {item!r} needs KEY=VALUE")
            values[key] = val
        unknown = set(values) - {"file", "format", "id", "size", "cluster_size", "backing"}
        if unknown:
            raise ValueError(f"unknown drive option {sorted(unknown)[0]!r} in {text!r}")
        if "file" not in values:
            raise ValueError(f"drive {text!r} needs file=PATH")
        if values.get("format", "qcow2") not in ("qcow2", "raw"):
            raise ValueError(f"drive format must be qcow2 or raw, not {values['format']!r}")
        return cls(file=os.path.abspath(values["file"]), id=values.get("id", f"drive{index}"),
                   format=values.get("format"), size=parse_size(values.get("size", "0")),
                   cluster_size=parse_size(values.get("cluster_size", "65536")),
                   backing=values.get("backing"))

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class Disk:
    """One open drive of the guest and its dirty-chunk log."""

    def __init__(self, spec: DriveSpec, inactive: bool = False) -> None:
        self.spec = spec
        if not os.path.exists(spec.file):
            if not spec.size:
                raise FileNotFoundError(f"drive {spec.id}: {spec.file} does not exist (give size= to create it)")
            create_image(spec.file, spec.size, spec.format or "qcow2", cluster_size=spec.cluster_size,
                         backing=spec.backing)
        self.image: Image = open_image(spec.file, spec.format, inactive=inactive)
        self.dirty = np.zeros(self.chunks, np.bool_)

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def size(self) -> int:
        return self.image.size

    @property
    def chunks(self) -> int:
        return (self.image.size + CHUNK - 1) // CHUNK

    def mark(self, offset: int, length: int) -> None:
        self.dirty[offset // CHUNK:(offset + length - 1) // CHUNK + 1] = True

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.image.write(offset, data)
        self.mark(offset, len(data))  # after writing, as the RAM log is

    def write_zeroes(self, offset: int, length: int) -> None:
        self.image.write_zeroes(offset, length)
        self.mark(offset, length)

    def read_chunk(self, index: int) -> bytes:
        start = index * CHUNK
        return self.image.read(start, min(CHUNK, self.size - start))

    def allocated_chunks(self) -> np.ndarray:
        """Chunks the top image allocates (for incremental block migration)."""
        return np.array([self.image.is_allocated(i * CHUNK, min(CHUNK, self.size - i * CHUNK))
                         for i in range(self.chunks)], np.bool_)

    def harvest(self) -> np.ndarray:
        out = self.dirty.copy()
        self.dirty[:] = False
        return out

    def info(self) -> dict:
        return {"device": self.id, "inserted": {"file": self.spec.file, "drv": self.image.format,
                                                "virtual-size": self.size, "active": self.image.active}}

    def close(self) -> None:
        self.image.close()
