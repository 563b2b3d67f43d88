"""CPU seconds and private memory of a host's actor processes, from /proc."""

from __future__ import annotations

import os
import threading
import time

from livemig.actors.forked import MODULES
from livemig.tools.launch import HostProcess

CLK_TCK = os.sysconf("SC_CLK_TCK")


def actor_pids(host_pid: int) -> dict[str, int]:
    """The actor processes of a host: its children, each named after its
    actor (actors/forked.py); the host's reaper keeps the host's name."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != host_pid:
                continue
            with open(f"/proc/{entry}/comm") as f:
                name = f.read().strip()
        except (OSError, IndexError, ValueError):
            continue
        if name in MODULES or (name.startswith("vcpu") and name[4:].isdigit()):
            out[name] = int(entry)
    return out


def cpu_seconds(pid: int) -> float:
    """CPU time of one process, all its threads, ended ones too. Its CPU clock
    counts nanoseconds; utime + stime in /proc count 10 ms ticks, too coarse
    for the tenths of a second a small guest takes, so they are the fallback."""
    try:
        return time.clock_gettime(((~pid) << 3) | 2)  # the kernel's process-wide CPUCLOCK_SCHED id
    except OSError:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK


def is_guest_ram(path: str) -> bool:
    """A guest RAM mapping in smaps: a host's memfd (actors/host.py) or a file in /dev/shm."""
    return path.startswith(("/memfd:livemig-", "/dev/shm/livemig-")) and ".ram" in path


def private_memory(pid: int) -> dict[str, int]:
    """Private bytes of a process outside the guest RAM mapping, from
    /proc/PID/smaps: `private` (clean + dirty), of which `anon` anonymous."""
    private = anon = 0
    skip = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if not line.split(None, 1)[0].endswith(":"):
                # a mapping header: "start-end perms offset dev inode [path]"
                parts = line.split(None, 5)
                skip = len(parts) == 6 and is_guest_ram(parts[5].strip())
                continue
            head, _, rest = line.partition(":")
            if skip:
                continue
            if head in ("Private_Clean", "Private_Dirty"):
                private += int(rest.split()[0]) * 1024
            elif head == "Anonymous":
                anon += int(rest.split()[0]) * 1024
    return {"private": private, "anon": anon}


def rss_anon(pid: int) -> int:
    """Anonymous resident bytes (cheap: no page-table walk). The guest RAM is
    a shared file mapping, so it is never counted here."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class Watch:
    """CPU seconds and peak private memory of every actor of some hosts,
    between start() and stop(); memory is sampled by a thread at 10 Hz."""

    def __init__(self, hosts: dict[str, HostProcess]) -> None:
        self.pids = {f"{side}/{name}": pid for side, h in hosts.items()
                     for name, pid in actor_pids(h.proc.pid).items()}
        self.cpu0: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.peak_anon: dict[str, int] = dict.fromkeys(self.pids, 0)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            for key, pid in self.pids.items():
                try:
                    self.peak_anon[key] = max(self.peak_anon[key], rss_anon(pid))
                except OSError:
                    pass
            if self.done.wait(0.1):
                return

    def start(self) -> None:
        self.cpu0 = {k: cpu_seconds(p) for k, p in self.pids.items()}
        self.thread.start()

    def lap(self, side: str) -> None:
        """Take the CPU figures of one side now (when its part is done)."""
        for key, pid in self.pids.items():
            if key.startswith(side + "/"):
                self.cpu[key] = cpu_seconds(pid) - self.cpu0[key]

    def stop(self) -> dict:
        self.done.set()
        self.thread.join(5)
        memory = {}
        for key, pid in self.pids.items():
            self.cpu.setdefault(key, cpu_seconds(pid) - self.cpu0[key])
            mem = private_memory(pid)
            anon_now = rss_anon(pid)
            # Peak anonymous memory, plus the private file-backed pages (constant).
            memory[key] = max(self.peak_anon[key], anon_now) + max(0, mem["private"] - mem["anon"])
        return {"cpu": self.cpu, "private": memory}
