"""Scenario 10, xbzrle: bytes on the wire with and without XBZRLE for a running
guest that rewrites B bytes (64, 512) of pages already sent.

A fair comparison has the two migrations do the same work: the same guest
(memtouch over a working set that fits the cache, the whole set dirtied
during the first pass), the same link (max-bandwidth, counted in whole pages
with or without XBZRLE), and a dirty phase of the same length after the
first pass (downtime-limit 0 holds the switchover off for XBZRLE_WINDOW
seconds, then 300 ms lets it happen). The first pass sends every page whole
in both (QEMU's rule: XBZRLE starts after it), so it is reported apart; the
second pass fills the cache (misses go whole) and is part of the dirty phase.
Wire bytes are query-migrate's final `transferred` (the bytes the writer
put on the channel)."""

from __future__ import annotations

import time

from livemig.machine.runstate import MIGRATION_END
from livemig.machine.workload import PAGE_SIZE
from livemig.tools.launch import free_port

from .migrate import Guest, Hosts, qmp_call
from .targets import MiB, mbps

XBZRLE_RAM = 64 * MiB
XBZRLE_WSS = 8 * MiB  # an eighth of the 64 MiB cache: no slot is shared
XBZRLE_RATE = 8 * MiB  # bytes/s in whole pages: each working-set page rewritten about once a second
XBZRLE_BANDWIDTH = 16 * MiB  # the first pass takes 4 s: the whole working set is dirty after it
XBZRLE_WINDOW = 8.0  # s of dirty phase after the first pass
XBZRLE_BYTES = (64, 512)
XBZRLE_TIMEOUT = 120.0
RECORD = PAGE_SIZE + 8  # a whole page on the wire: header and page


def one(touch: int, xbzrle: bool, tag: str) -> dict:
    """One migration of the scenario; figures of its first pass and dirty phase."""
    workload = f"memtouch:rate={XBZRLE_RATE},wss={XBZRLE_WSS},bytes={touch}"
    guest = Guest(XBZRLE_RAM, "random", workload, stopped=False)
    uri = f"tcp:127.0.0.1:{free_port()}"
    # downtime-limit 0 makes the coordinator warn at every stalled pass: by design here.
    with Hosts(guest, uri, tag, env={"LIVEMIG_LOG": "ERROR"}) as hosts:
        mon = hosts.src.qmp()
        try:
            qmp_call(mon, "migrate-set-capabilities", capabilities=[{"capability": "xbzrle", "state": xbzrle}])
            qmp_call(mon, "migrate-set-parameters", **{"max-bandwidth": XBZRLE_BANDWIDTH, "downtime-limit": 0})
            time.sleep(0.5)  # the guest dirties its working set before the first pass
            t0 = time.monotonic()
            qmp_call(mon, "migrate", uri=uri)
            first_done = released = None
            syncs = 0
            while (info := qmp_call(mon, "query-migrate"))["status"] not in MIGRATION_END:
                now = time.monotonic() - t0
                count = info.get("ram", {}).get("dirty-sync-count", 0)
                syncs = syncs or count  # the setup's sync
                if first_done is None and count > syncs:
                    first_done = now
                if first_done is not None and released is None and now - first_done >= XBZRLE_WINDOW:
                    qmp_call(mon, "migrate-set-parameters", **{"downtime-limit": 300})
                    released = now
                if now > XBZRLE_TIMEOUT:
                    qmp_call(mon, "migrate_cancel")
                    raise TimeoutError(f"{tag}: xbzrle migration not done after {XBZRLE_TIMEOUT:.0f} s")
                time.sleep(0.05)
        finally:
            mon.close()
        hosts.dst.wait_migration(60)
    if info["status"] != "completed" or first_done is None:
        raise RuntimeError(f"{tag}: migration {info['status']}: {info.get('error-desc')}")
    ram = info["ram"]
    pages = XBZRLE_RAM // PAGE_SIZE
    first_pass = pages * RECORD  # random RAM: every page once, whole, in both runs
    cache = info.get("xbzrle-cache") or {}
    resent = ram["normal"] - pages  # livemig's `normal` counts deltas too: every non-zero page queued
    dirty_bytes = ram["transferred"] - first_pass
    dirty_time = info["total-time"] / 1000 - first_done
    # After the pass that fills the cache (its misses go whole): what a page
    # already in the cache costs.
    misses = cache.get("cache-miss", 0)
    warm_pages = resent - misses
    warm = (dirty_bytes - misses * RECORD) / warm_pages if warm_pages > 0 else 0
    return {"bytes-per-touch": touch, "xbzrle": xbzrle, "status": info["status"],
            "transferred": ram["transferred"], "first-pass-bytes": first_pass,
            "dirty-phase-bytes": dirty_bytes, "dirty-phase-time": int(dirty_time * 1000),
            "dirty-sync-count": ram.get("dirty-sync-count"), "pages-resent": resent,
            "wire-bytes-per-resent-page": dirty_bytes / resent, "wire-bytes-per-warm-page": warm,
            "dirty-phase-mbps": mbps(dirty_bytes / dirty_time), "total-time": info["total-time"],
            "downtime": info.get("downtime"), "xbzrle-cache": cache or None}


def xbzrle_bench(log, tag) -> list[dict]:
    """Per bytes-per-touch: the run without XBZRLE, the run with, and their ratios."""
    out = []
    for touch in XBZRLE_BYTES:
        rows = {on: one(touch, on, tag()) for on in (False, True)}
        off, on = rows[False], rows[True]
        for r in (off, on):
            log(f"  xbzrle bytes={touch} {'on ' if r['xbzrle'] else 'off'}: {r['transferred'] / MiB:.1f} MiB in all, "
                f"{r['dirty-phase-bytes'] / MiB:.2f} MiB in the {r['dirty-phase-time']} ms after the first pass "
                f"({r['pages-resent']} pages, {r['wire-bytes-per-resent-page']:.0f} B each); "
                f"cache {r['xbzrle-cache']}")
        row = {"bytes-per-touch": touch, "off": off, "on": on,
               "dirty-phase-ratio": off["dirty-phase-mbps"] / on["dirty-phase-mbps"],
               "per-page-ratio": off["wire-bytes-per-resent-page"] / on["wire-bytes-per-resent-page"],
               "warm-ratio": off["wire-bytes-per-resent-page"] / on["wire-bytes-per-warm-page"],
               "total-ratio": off["transferred"] / on["transferred"]}
        out.append(row)
        log(f"  xbzrle bytes={touch}: {row['dirty-phase-ratio']:.1f}x fewer bytes per second after the first pass, "
            f"{row['per-page-ratio']:.1f}x per page re-sent, {row['warm-ratio']:.0f}x once cached, "
            f"{row['total-ratio']:.2f}x in all")
    return out
