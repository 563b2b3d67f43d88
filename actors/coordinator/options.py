"""Migration parameters and capabilities, and their defaults."""

from __future__ import annotations

DEFAULT_PARAMETERS = {
    "max-bandwidth": 128 << 20,  # bytes/s, QEMU's default since 5.2; 0 = unlimited
    "downtime-limit": 300,  # ms
    "xbzrle-cache-size": 64 << 20,  # bytes, a power of two of at least one page
    "avail-switchover-bandwidth": 0,
    # testing aids (docs/reliability.md): a fault to inject, "POINT:ACTION", and how
    # long a connected transport may make no progress before the migration fails
    "max-postcopy-bandwidth": 0,  # bytes/s for the background push in post-copy; 0 = unlimited
    # livemig: switch to post-copy by itself once this many dirty-log passes are done (0: only
    # on migrate-start-postcopy); needs postcopy-ram
    "x-postcopy-after-passes": 0,
    "x-fault": "",
    "x-transport-timeout": 30_000,  # ms
    # TLS (docs/security.md): the id of a tls-creds-x509 object ("" = plaintext), the name
    # the destination's certificate must carry (default: the tcp host), and on the
    # destination the id of an authz-simple / authz-list object for client DNs
    "tls-creds": "",
    "tls-hostname": "",
    "tls-authz": "",
}
DEFAULT_CAPABILITIES = {  # QEMU's order, then livemig's own
    "xbzrle": False,  # re-dirtied pages as deltas against the copy sent before
    "events": False,
    "postcopy-ram": False,  # the guest switches early and fetches pages on demand (both sides)
    "return-path": True,
    "pause-before-switchover": False,
    "postcopy-blocktime": False,
    # testing aid: the destination keeps stale image metadata (the seed's bug)
    "x-skip-invalidate": False,
    # integrity: send digests of the final RAM, checked before the guest runs
    "x-digest": False,
}
