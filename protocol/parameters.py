"""Migration parameters and capabilities, one row each, named as QEMU names them.

From this table come the checks of migrate-set-parameters and
migrate-set-capabilities, the defaults that query-migrate-parameters and
query-migrate-capabilities report, and the units, order and size reading of
HMP's `info migrate_parameters` and `migrate_set_parameter`. Rows that livemig
does not support (supported=False) are QEMU 7.2's: they are neither reported nor
accepted, and setting one is refused as "not supported by livemig", apart from
a name QEMU does not know either (refused in QEMU's words)."""

from __future__ import annotations

from dataclasses import dataclass

Value = int | bool | str


@dataclass(frozen=True)
class Parameter:
    name: str
    type: type  # int, bool or str (JSON integer, boolean, string)
    default: Value
    range: tuple[int, int | None] | None = None  # integers, inclusive; None = no upper limit
    unit: str = ""  # printed after the value by `info migrate_parameters`
    size_shift: int | None = None  # a size for HMP: a bare number is in units of 1 << size_shift
    supported: bool = True
    nullable: bool = False  # QMP null sets the empty value (QEMU's StrOrNull)
    choices: tuple[str, ...] = ()  # a QAPI enum: one of these (HMP prints it unquoted)

    def range_error(self, value: int) -> str | None:
        """QEMU's words for an integer outside the range, or None."""
        if self.range is None:
            return None
        low, high = self.range
        if value < 0 <= low:
            return f"Parameter '{self.name}' expects a non-negative integer"
        if value < low and high is None:
            return f"Parameter '{self.name}' must be at least {low}{self.unit}"
        if value < low or (high is not None and value > high):
            words = _UNIT_WORDS.get(self.unit, "")
            return (f"Parameter '{self.name.replace('-', '_')}' expects an integer in the range of "
                    f"{low} to {high}{words}")
        return None


@dataclass(frozen=True)
class Capability:
    name: str
    default: bool = False
    supported: bool = True


_UNIT_WORDS = {" ms": " milliseconds"}
MS, BYTES_PER_S = " ms", " bytes/second"
NON_NEGATIVE = (0, None)

# In the order `info migrate_parameters` prints them.
PARAMETERS: dict[str, Parameter] = {p.name: p for p in (
    Parameter("announce-initial", int, 50, unit=MS, supported=False),
    Parameter("announce-max", int, 550, unit=MS, supported=False),
    Parameter("announce-rounds", int, 5, supported=False),
    Parameter("announce-step", int, 100, unit=MS, supported=False),
    Parameter("compress-level", int, 1, supported=False),
    Parameter("compress-threads", int, 8, supported=False),
    Parameter("compress-wait-thread", bool, True, supported=False),
    Parameter("decompress-threads", int, 2, supported=False),
    # auto-converge: throttle when the bytes dirtied in a sync period exceed this share (%)
    # of the bytes sent in it, twice; first to cpu-throttle-initial, then up by the increment
    Parameter("throttle-trigger-threshold", int, 50, (1, 100)),  # %
    Parameter("cpu-throttle-initial", int, 20, (1, 99)),  # %
    Parameter("cpu-throttle-increment", int, 10, (1, 99)),  # %
    Parameter("cpu-throttle-tailslow", bool, False),
    Parameter("max-cpu-throttle", int, 99, (1, 99)),  # %
    # TLS (docs/security.md): the id of a tls-creds-x509 object ("" = plaintext), the name
    # the destination's certificate must carry (default: the tcp host), and on the
    # destination the id of an authz-simple / authz-list object for client DNs
    Parameter("tls-creds", str, "", nullable=True),
    Parameter("tls-hostname", str, "", nullable=True),
    # QEMU's default since 5.2; 0 = unlimited. HMP reads a bare number in MiB.
    Parameter("max-bandwidth", int, 128 << 20, NON_NEGATIVE, BYTES_PER_S, size_shift=20),
    # QEMU 8.2's avail-switchover-bandwidth, which 7.2 lacks: the bandwidth (bytes/s) the
    # switchover decision assumes instead of the measured one (0 = measured)
    Parameter("x-avail-switchover-bandwidth", int, 0, NON_NEGATIVE, BYTES_PER_S, size_shift=0),
    Parameter("downtime-limit", int, 300, (0, 2_000_000), MS),
    Parameter("x-checkpoint-delay", int, 20_000, unit=MS, supported=False),
    Parameter("block-incremental", bool, False),  # with block migration: only the top image's clusters
    # multifd: extra connections for the pages, and how each compresses its stream
    # (ranges and names checked by protocol.multifd.check_parameter, in QEMU's words)
    Parameter("multifd-channels", int, 2),
    Parameter("multifd-compression", str, "none", choices=("none", "zlib", "zstd")),
    Parameter("multifd-zlib-level", int, 1),  # 0..9
    Parameter("multifd-zstd-level", int, 1),  # 0..20
    # a power of two of at least one page (protocol.xbzrle.check_cache_size)
    Parameter("xbzrle-cache-size", int, 64 << 20, NON_NEGATIVE, " bytes", size_shift=0),
    # bytes/s for the background push in post-copy; 0 = unlimited
    Parameter("max-postcopy-bandwidth", int, 0, NON_NEGATIVE, size_shift=0),
    Parameter("tls-authz", str, "", nullable=True),
    # dirty-limit (QEMU 8.1's): the per-vCPU page-dirtying quota (MiB/s) the same trigger applies
    Parameter("x-vcpu-dirty-limit-period", int, 1000, (1, 1000), MS),
    Parameter("vcpu-dirty-limit", int, 1, (1, None), " MB/s"),
    # livemig: switch to post-copy by itself once this many dirty-log passes are done (0: only
    # on migrate-start-postcopy); needs postcopy-ram
    Parameter("x-postcopy-after-passes", int, 0, NON_NEGATIVE),
    # testing aids (docs/reliability.md): a fault to inject, "POINT:ACTION", and how
    # long a connected transport may make no progress before the migration fails
    # (0 would make its socket non-blocking)
    Parameter("x-fault", str, ""),
    Parameter("x-transport-timeout", int, 30_000, (1, None), MS),
)}

# In QEMU's order (`info migrate_capabilities`), livemig's own last.
CAPABILITIES: dict[str, Capability] = {c.name: c for c in (
    Capability("xbzrle"),  # re-dirtied pages as deltas against the copy sent before
    Capability("rdma-pin-all", supported=False),
    Capability("auto-converge"),  # throttle the vCPUs when dirtying outpaces the link
    Capability("zero-blocks", supported=False),
    Capability("compress", supported=False),
    Capability("events"),
    # the guest switches early and fetches pages on demand (both sides)
    Capability("postcopy-ram"),
    Capability("x-colo", supported=False),
    Capability("release-ram", supported=False),
    Capability("block"),  # block migration for every migrate, as its blk argument asks
    Capability("return-path"),  # off as in QEMU; livemig's clients turn it on (docs/monitor.md)
    Capability("pause-before-switchover"),
    Capability("dirty-bitmaps", supported=False),
    Capability("multifd"),  # pages over multifd-channels more connections, in parallel
    Capability("postcopy-blocktime"),
    Capability("late-block-activate", supported=False),
    Capability("x-ignore-shared", supported=False),
    Capability("validate-uuid", supported=False),
    Capability("background-snapshot", supported=False),
    Capability("zero-copy-send", supported=False),
    Capability("postcopy-preempt", supported=False),
    # QEMU 8.1's (7.2 has only set-vcpu-dirty-limit and its kin)
    Capability("dirty-limit"),  # cap the vCPUs' dirty rate instead (conflicts with auto-converge)
    # testing aid: the destination keeps stale image metadata (the seed's bug)
    Capability("x-skip-invalidate"),
    # integrity: send digests of the final RAM, checked before the guest runs
    Capability("x-digest"),
)}


def parameter_refusal(name: str) -> str:
    """Why migrate-set-parameters refuses NAME, one livemig does not take: QEMU's
    words for a name QEMU 7.2 lacks too, livemig's for one of QEMU's."""
    if name in PARAMETERS:
        return f"Parameter '{name}' is not supported by livemig"
    return f"Parameter '{name}' is unexpected"


def capability_refusal(name: str, where: str) -> str:
    """The same for a capability NAME at `where` in migrate-set-capabilities' list."""
    if name in CAPABILITIES:
        return f"Capability '{name}' is not supported by livemig"
    return f"Parameter '{where}' does not accept value '{name}'"


def default_parameters() -> dict[str, Value]:
    return {p.name: p.default for p in PARAMETERS.values() if p.supported}


def default_capabilities() -> dict[str, bool]:
    return {c.name: c.default for c in CAPABILITIES.values() if c.supported}
