"""The incoming migration: listen, follow the receiver's load, then check the
result, load the vCPUs, re-read the disks and run the guest."""

from __future__ import annotations

import asyncio
import time

from livemig.actors.base import ActorError, log
from livemig.actors.coordinator.state import MigrationFailed, MigrationState
from livemig.machine.ram import PAGE_SIZE
from livemig.machine.runstate import MigrationStatus, StateError
from livemig.protocol import events as ev
from livemig.protocol.devices import DIGEST_SECTION
from livemig.protocol.messages import Message
from livemig.protocol.uri import UriError, parse_uri


class Incoming:
    """Mixin of the Coordinator."""

    async def on_receiver_notice(self, msg: Message) -> None:
        await self.workers_ready.wait()  # a successor first learns where the receiver is
        if msg.type == "started":
            self.mig.start = time.monotonic()
            self.mig.tls = msg.data.get("tls")
            self.set_status(MigrationStatus.ACTIVE)
            if not self.parameters["x-fault"].endswith(":slow"):
                await asyncio.sleep(0.2)  # so that a fault strikes mid-stream
            await self.fault("incoming")
        elif msg.type == "failed":
            self.mig.incoming = True
            self.mig.error = msg.data["desc"]
            self.mig.end = time.monotonic()
            log.warning("incoming migration failed: %s", msg.data["desc"])
            self.set_status(MigrationStatus.FAILED)
            if self.exit_on_error:
                self.stop_event.set()
        elif msg.type == "refused":  # a connection that failed its TLS handshake; still listening
            log.warning("incoming migration: refused a connection: %s", msg.data["desc"])
            self.mig.refused.append(msg.data["desc"])
        elif msg.type == "loaded":
            await self.finish_incoming(msg.data)
        elif msg.type == "go":
            await self.run_incoming()
        elif msg.type == "abandoned":
            await self.fail_incoming(msg.data["desc"])
        elif msg.type == "postcopy-run":
            await self.postcopy_run(msg.data)
        elif msg.type == "postcopy-done":
            self.postcopy_done(msg.data)
        elif msg.type == "postcopy-paused":
            self.postcopy_paused(msg.data)
        elif msg.type == "recover-started":
            self.set_status(MigrationStatus.POSTCOPY_RECOVER)
        elif msg.type == "postcopy-resumed":
            self.mig.error = None
            self.set_status(MigrationStatus.POSTCOPY_ACTIVE)

    def note_loaded(self, data: dict) -> dict | None:
        """The figures and device state of a loaded stream; returns its digests."""
        self.mig.ram = {"transferred": data["bytes"] + data["multifd"], "remaining": 0, "total": self.ram.size,
                        "multifd-bytes": data["multifd"],
                        "duplicate": data["zero"], "normal": data["normal"],
                        "normal-bytes": data["normal"] * PAGE_SIZE, "page-size": PAGE_SIZE}
        devices = dict(data.get("devices", {}))
        digests = devices.pop(DIGEST_SECTION, None)
        self.device_state.update(devices)
        return digests

    async def finish_incoming(self, data: dict) -> None:
        """The whole stream is in: load vCPU state, re-read disk metadata, run."""
        digests = self.note_loaded(data)
        fault = self.handover_fault()
        try:
            if fault != "after-eof":
                await self.fault("after-eof")
            if digests is not None:
                local = await asyncio.get_running_loop().run_in_executor(None, self.ram.digests)
                bad = [name for name, digest in digests.items() if local.get(name) != digest]
                if bad:
                    raise MigrationFailed(f"RAM digest mismatch in block {bad[0]!r}: the stream was damaged")
            states = data["vcpus"]
            if len(states) != len(self.vcpus) and self.profile.has_vcpus:
                raise ActorError(f"stream carries {len(states)} vCPUs, this guest has {len(self.vcpus)}")
            await asyncio.gather(*(v.call("set_state", {"registers": s}) for v, s in zip(self.vcpus, states, strict=False)))
            if self.guest_drives:
                # The seed's fix: drop every image's cached metadata and re-read it
                # (the source wrote to shared images until the end), before anything runs.
                await self.vcpus[0].call("drives_activate", {
                    "skip_invalidate": self.capabilities["x-skip-invalidate"]}, timeout=60)
            if data.get("disk"):
                self.mig.disk = data["disk"]
            if self.mig.status is not MigrationStatus.ACTIVE:
                raise MigrationFailed(self.mig.error or "incoming migration failed")
            # Everything that can fail is done: this host holds the guest's last
            # state. Tell the source; run on its go-ahead (handover.py).
            self.loaded = data
            self.mig.holder = "destination"
            go = (await self.receiver.call("finish", {"rc": 0, "fault": fault}, timeout=15)).data["result"]["go"]
            if not go and fault != "after-shut":
                await self.fault("after-shut")
        except (ActorError, StateError, MigrationFailed) as exc:
            try:
                await self.receiver.call("finish", {"rc": 1, "desc": str(exc)}, timeout=5)
            except ActorError as cleanup:
                log.warning("after a failed incoming migration: %s", cleanup)
            await self.fail_incoming(f"cannot start the migrated guest: {exc}")
            return
        if go:
            await self.run_incoming()

    async def fail_incoming(self, desc: str) -> None:
        """The guest will not run here: say so and let the images go."""
        self.mig.error = desc
        self.mig.end = time.monotonic()
        self.mig.holder = "source"
        self.set_status(MigrationStatus.FAILED)
        if self.guest_drives:
            try:
                await self.vcpus[0].call("drives_inactivate", timeout=60)  # the source takes them back
            except ActorError as cleanup:
                log.warning("after a failed incoming migration: %s", cleanup)

    async def start_incoming(self, uri: str) -> str:
        try:
            parse_uri(uri)
        except UriError as exc:
            raise ActorError(str(exc)) from None
        tls = self.tls_spec(uri, server=True)
        multifd = self.multifd_config(uri)
        # The state first: the receiver may report "started" before it answers.
        self.mig = MigrationState(start=time.monotonic(), incoming=True)
        self.go_taken = False
        self.mig.set(MigrationStatus.SETUP)
        self.publish(ev.MIGRATION, {"status": MigrationStatus.SETUP.value}, qmp=True)  # QEMU emits this one ungated
        try:
            await self.receiver.call("configure", {"postcopy": self.capabilities["postcopy-ram"]})
            reply = await self.receiver.call("listen", {"uri": uri, "tls": tls, "multifd": multifd,
                                                        "timeout": self.parameters["x-transport-timeout"]})
        except ActorError as exc:
            self.mig.set(MigrationStatus.FAILED)
            self.mig.error = str(exc)
            raise
        self.incoming_uri = reply.data["result"]["uri"]
        return self.incoming_uri

