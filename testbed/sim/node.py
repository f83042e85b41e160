"""One sim node: ``python -m testbed.sim.node --workdir W --cluster NAME --node NAME``.

Started detached by ``testbed up``. In order: record its pid, provision its
swtpm on first start (against the work dir's LocalCA), start that swtpm
detached (pid file in the node's run dir), run the measured boot of its
(possibly tampered) boot chain, load or create its persistent AK, start its
role, serve the agent API on ``run/agent.sock``, and write ``run/node.json``
with state ``ready``. Its swtpm listens on unix sockets only (``run/swtpm.sock`` and
``.ctrl``, 0600, or a short private directory when that path is too long): no other
local user reaches the node's TPM.

It stops, stopping its swtpm, on SIGTERM/SIGINT, on an agent ``shutdown``
request, or when its swtpm dies (then with exit status 1 and state ``failed``).
A failure while starting is logged (stderr goes to ``run/node.log``) and
recorded in node.json as ``failed`` with the error, which `up` reports.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from attestation.credential import CredentialChallenge
from attestation.encoding import b64encode
from attestation.errors import TestbedError
from attestation.evidence import Evidence
from attestation.files import atomic_write, private_dir
from attestation.ima import IMA_PCR
from attestation.tpm import TpmClient
from attestation.tpm_types import PcrSelection
from testbed.cluster.agent import BatchedEvidence
from testbed.cluster.state import load_spec
from testbed.core.errors import StateError
from testbed.core.paths import ClusterPaths
from testbed.roles.base import NodeContext, RoleService
from testbed.roles.disks import UNLOCK_ACTION, unlock_guest_disks
from testbed.roles.registry import start_node_service
from testbed.roles.revocation import (
    ACTIONS,
    PUBLIC_KEY,
    Decision,
    RevocationAware,
    RevocationEvent,
    RevocationGate,
    verifier_key_dir,
)
from testbed.sim.agent_server import AgentServer
from testbed.sim.node_info import NodeInfo, NodeInfoState
from testbed.spec.cluster_spec import ClusterSpec
from testbed.svd.volumes import detach_all
from testbed.tpm.boot import BANK, SIM_PCRS, boot_summary, measure_boot, restore_clock_safety
from testbed.tpm.latency import LatencyModel, TpmLatencyProxy
from testbed.tpm.localca import LocalCA
from testbed.tpm.runtime import BASELINE, RuntimeLog
from testbed.tpm.swtpm import STATE_FILE, Swtpm, provision
from trusted_passages.tpm import Batcher

log = logging.getLogger("testbed.sim.node")
_WATCH_INTERVAL_S = 0.2
RUNTIME_LOG = "runtime.log"  # the ima-ng log of this boot (run/, 0600)
# What a batching node's quotes cover: the verifier's selection for a node with a runtime
# policy (boot PCRs and PCR 10), so its challenges and the channels' bindings share quotes.
BATCH_SELECTION = PcrSelection(BANK, tuple(sorted({*SIM_PCRS.indices, IMA_PCR})))
LATENCY_SOCKET = "lat.sock"  # the TPM latency proxy's (+ .ctrl), beside swtpm.sock
REVOCATIONS = "revocations.json"  # the verifier's decisions applied (state/, kept)


class _Terminated(Exception):
    """A stop signal arrived while the node was still starting."""


class Node:
    """The node process: its swtpm, its TPM connection, its role and its agent."""

    def __init__(self, paths: ClusterPaths, name: str, spec: ClusterSpec | None = None) -> None:
        self.cluster_paths = paths
        self._spec = spec  # a swarm process parses the spec once for all its nodes
        self.paths = paths.node(name)
        self.name = name
        self.stopping = threading.Event()
        self.starting = True  # a stop signal aborts the start-up only while this holds
        self.stop_reason = ""
        self.failed = False
        self.started = time.monotonic()
        self.quotes = 0
        self.ctx: NodeContext | None = None
        self._swtpm: Swtpm | None = None
        self._latency: TpmLatencyProxy | None = None
        self._batcher: Batcher[Evidence] | None = None
        self._client: TpmClient | None = None
        self._role: RoleService | None = None
        self._agent: AgentServer | None = None
        self._runtime: RuntimeLog | None = None
        self._info = NodeInfo(name, paths.name, os.getpid(), str(self.paths.socket))

    # -- lifecycle ---------------------------------------------------------------

    def run(self) -> int:
        try:
            self._start()
            self.starting = False
            self._write_info("ready")
            log.info("ready: agent on %s", self.paths.socket)
            self._watch()
        except _Terminated:
            self.stop_reason = "signal while starting"
        except TestbedError as exc:
            self._fail(str(exc))
        except Exception as exc:  # a bug: still record it and stop the swtpm
            log.exception("node crashed")
            self._fail(f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._close()
        if not self.failed:
            self._write_info("stopped")
        log.info("stopped (%s)", self.stop_reason or "done")
        return 1 if self.failed else 0

    # -- hosted by a swarm process (testbed.sim.swarm): no signals, no loop of its own ----

    def start_hosted(self) -> bool:
        """Start as one of a swarm process's nodes: whether it is ready. A failure is
        recorded in node.json (as :meth:`run` does) and what had started is stopped."""
        try:
            self._start()
        except TestbedError as exc:
            self._fail(str(exc))
        except Exception as exc:  # a bug: recorded, and the swarm's other nodes go on
            log.exception("node %s crashed while starting", self.name)
            self._fail(f"internal error: {type(exc).__name__}: {exc}")
        else:
            self.starting = False
            self._write_info("ready")
            return True
        self._close()
        return False

    def alive(self) -> bool:
        """One watch step: false once the node was asked to stop or its swtpm died."""
        if self.stopping.is_set():
            return False
        if self._swtpm is not None and not self._swtpm.running:
            self.request_stop("swtpm died")
            self._fail(f"swtpm exited unexpectedly:\n{self._swtpm.log_tail(5)}")
            return False
        return True

    def stop_hosted(self, reason: str) -> None:
        """Stop this node (its agent, role, TPM connection and swtpm) and say so."""
        self.request_stop(reason)
        self._close()
        if not self.failed:
            self._write_info("stopped")
        log.info("node %s stopped (%s)", self.name, self.stop_reason)

    def request_stop(self, reason: str) -> None:
        if not self.stopping.is_set():
            self.stop_reason = reason
            self.stopping.set()

    def _fail(self, error: str) -> None:
        self.starting = False
        self.stop_reason = self.stop_reason or "failed"
        log.error("%s", error)
        self.failed = True
        self._write_info("failed", error=error)

    def _start(self) -> None:
        spec = self._spec or load_spec(self.cluster_paths)
        node_spec = spec.node(self.name)
        boot = node_spec.effective_boot
        ca = LocalCA.ensure(self.cluster_paths.ca_dir)
        self._ensure_tpm_state(ca)
        client = self._start_tpm(node_spec.tpm_latency)
        if restore_clock_safety(client):  # swtpm was stopped without TPM2_Shutdown
            log.info("TPM clock was unsafe after an unorderly stop: advanced to a save point")
        event_log = measure_boot(client, boot)
        self._runtime = RuntimeLog(self.paths.run / RUNTIME_LOG)
        for path, content in BASELINE:  # what the node runs after its boot, like IMA
            self._runtime.measure(client, path, content)
        ek = client.endorsement_key("rsa")
        if ek.certificate is None:
            raise StateError("the TPM has no RSA EK certificate; was it provisioned?")
        ak = client.attestation_key("ecc")
        if node_spec.batch_window is not None:
            # Fixed windows (not eager): every nonce arriving within one shares its quote.
            self._batcher = Batcher(self._quote_root, node_spec.batch_window, eager=False)
            self._info.batch_window_ms = round(node_spec.batch_window * 1000, 3)
        self.ctx = NodeContext(
            name=self.name, role=node_spec.role, spec=node_spec, cluster=spec, boot=boot,
            tpm=client, tpm_lock=threading.Lock(), ak=ak, ak_algorithm="ecc", ek=ek,
            event_log=event_log, paths=self.paths, cluster_paths=self.cluster_paths, ca=ca,
            tcti=client.tcti, stopping=self.stopping,
            revocations=RevocationGate(self.paths.state / REVOCATIONS,
                                       verifier_key_dir(self.cluster_paths) / PUBLIC_KEY),
            batched_quote=None if self._batcher is None else self._batcher.submit)
        self._info.role, self._info.boot = node_spec.role, boot_summary(boot)
        self._info.tampered = list(node_spec.tampered.fields() if node_spec.tampered else ())
        self._role = start_node_service(self.ctx)
        self._agent = AgentServer(self, self.paths.socket)
        self._agent.start()

    def _start_tpm(self, latency: float) -> TpmClient:
        # Assigned before start(): a signal arriving mid-start still gets it stopped.
        self._swtpm = Swtpm(self.paths.state, run_dir=self.paths.run, detached=True)
        self._swtpm.start()
        log.info("swtpm pid %d, %s", self._swtpm.pid, self._swtpm.tcti)
        self._info.swtpm_pid, self._info.tcti = self._swtpm.pid, self._swtpm.tcti
        tcti = self._swtpm.tcti
        if latency > 0:  # the spec's tpm_latency: a hardware TPM's pace (docs/protocol.md)
            # Beside swtpm's own sockets, whose directory fits the longer swtpm.sock.ctrl.
            listen = self._swtpm.socket_path.parent / LATENCY_SOCKET
            self._latency = TpmLatencyProxy(self._swtpm, listen, LatencyModel(signing=latency))
            tcti = self._latency.tcti
            self._info.tpm_latency_ms = round(latency * 1000, 3)
            log.info("TPM latency model: %g ms per signing command", latency * 1000)
        self._client = TpmClient(tcti)
        return self._client

    def _ensure_tpm_state(self, ca: LocalCA) -> None:
        """Provision on first start, into a staging directory renamed when complete.

        A node killed while swtpm_setup runs must not leave a half-made TPM
        (no EK certificate, say) that every later start would trip over.
        """
        state = self.paths.state
        if (state / STATE_FILE).exists():
            return
        if state.exists() and not state.is_dir():
            raise StateError(f"{state} is not a directory")
        staging = state.with_name("state.provisioning")
        shutil.rmtree(staging, ignore_errors=True)
        log.info("provisioning a new TPM for %s", self.name)
        provision(staging, ca)
        if state.exists():
            shutil.rmtree(state)  # empty or half-written by an interrupted start
        os.rename(staging, state)

    def _watch(self) -> None:
        """Until asked to stop: also stop (as failed) if the swtpm dies under us."""
        assert self._swtpm is not None
        while not self.stopping.wait(_WATCH_INTERVAL_S):
            if not self._swtpm.running:
                self.request_stop("swtpm died")
                self._fail(f"swtpm exited unexpectedly:\n{self._swtpm.log_tail(5)}")

    def _close(self) -> None:
        """Tear down in reverse order; each step runs even if an earlier one failed."""
        self.starting = False
        self.stopping.set()
        steps = [
            ("agent", self._agent.close if self._agent else None),
            ("role", self._role.stop if self._role else None),
            ("disks", self._lock_disks),
            ("TPM connection", self._close_client),
            ("TPM latency proxy", self._latency.close if self._latency else None),
            ("swtpm", self._swtpm.stop if self._swtpm else None),
        ]
        for what, step in steps:
            if step is None:
                continue
            try:
                step()
            except Exception:
                log.exception("stopping the %s failed", what)

    def _lock_disks(self) -> None:
        """A stopped node's encrypted disks are locked (docs/svd.md): their daemons
        stopped by PID, the keys gone with them, the plain views removed."""
        locked = detach_all(self.paths.state, self.paths.run, self.name)
        if locked:
            log.info("disks locked: %s", ", ".join(locked))

    def _close_client(self) -> None:
        if self._client is None:
            return
        if self.ctx is not None:
            with self.ctx.tpm_lock:  # let an in-flight request finish first
                self._client.close()
        else:
            self._client.close()

    def _write_info(self, state: NodeInfoState, error: str | None = None) -> None:
        self._info.state, self._info.updated, self._info.error = state, time.time(), error
        try:
            self._info.save(self.paths.info)
        except OSError as exc:  # e.g. `down --purge` removed the directory already
            log.warning("cannot write node.json: %s", exc)

    # -- the agent backend ---------------------------------------------------------

    def _context(self) -> NodeContext:
        if self.ctx is None:
            raise StateError("node is not ready")
        return self.ctx

    def identity(self) -> dict[str, Any]:
        ctx = self._context()
        assert ctx.ek.certificate is not None  # checked in _start
        return {"node": self.name, "role": ctx.role, "ek_algorithm": ctx.ek.algorithm,
                "ek_certificate": b64encode(ctx.ek.certificate),
                "ek_public": b64encode(ctx.ek.public), "ak_public": b64encode(ctx.ak.public)}

    def activate(self, challenge: CredentialChallenge) -> bytes:
        return self._context().activate_credential(challenge)

    def quote(self, nonce: bytes, selection: PcrSelection) -> Evidence | BatchedEvidence:
        """A verifier's challenge. A batching node answers it with its batch's quote and
        the nonce's path, when the selection is the batch's (the verifier's own)."""
        self.quotes += 1
        if self._batcher is not None and selection == BATCH_SELECTION:
            return BatchedEvidence(*self._batcher.submit(nonce))
        return self._context().quote(nonce, selection)

    def _quote_root(self, qualifying: bytes) -> Evidence:
        """A batch's one quote: over the boot PCRs and PCR 10, for verifier and peers."""
        return self._context().quote(qualifying, BATCH_SELECTION)

    def status(self) -> dict[str, Any]:
        # Not its "error": on the agent's wire that key means the request failed.
        info = {k: v for k, v in self._info.to_dict().items() if k != "error"}
        return {**info, "state": "stopping" if self.stopping.is_set() else "ready",
                "service": self._role.describe().to_dict() if self._role else None,
                "uptime_s": round(time.monotonic() - self.started, 1), "quotes": self.quotes,
                # Signing commands that reached the TPM (known behind the latency model).
                "tpm_quotes": self._latency.signed if self._latency else None}

    def shutdown(self) -> None:
        self.request_stop("agent shutdown request")

    def role_call(self, action: str, args: dict[str, Any]) -> dict[str, Any]:
        if self._role is None:
            raise StateError(f"node {self.name} is not ready")
        if action in ACTIONS:  # the verifier's signed decisions: every role receives them
            return self._decision(action, args)
        if action == UNLOCK_ACTION:  # guest-side disks: any role may have them
            return unlock_guest_disks(self._context())
        return self._role.call(action, args)

    def _decision(self, action: str, args: dict[str, Any]) -> dict[str, Any]:
        ctx = self._context()
        decision: Decision | None = ctx.revocations.receive(action, args)
        answer: dict[str, Any] = {"node": self.name, "applied": decision is not None,
                                  "sequence": ctx.revocations.sequence}
        if decision is not None and isinstance(self._role, RevocationAware):
            answer["effects"] = (self._role.revoked(decision)
                                 if isinstance(decision, RevocationEvent)
                                 else self._role.reinstated(decision))
        return answer

    def runtime_log(self, offset: int) -> bytes:
        if self._runtime is None:
            raise StateError("node is not ready")
        return self._runtime.read(offset)

    def runtime_measure(self, path: str, content: bytes) -> dict[str, Any]:
        """The node "executes" ``path`` (its bytes: ``content``): measured like IMA does."""
        runtime = self._runtime
        if runtime is None:
            raise StateError("node is not ready")
        with self._context().tpm_session() as tpm:
            entry = runtime.measure(tpm, path, content)
        return entry.to_dict()


def _install_signal_handlers(node: Node) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        node.request_stop(signal.Signals(signum).name)
        if node.starting:
            raise _Terminated  # abort the start-up where it is; run() cleans up

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m testbed.sim.node",
                                     description="one sim node (started by `testbed up`)")
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--node", required=True)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    # Everything the node writes (state, sockets, logs) is its owner's only, however it
    # was started (`up` starts it under umask 077 already).
    os.umask(0o077)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s node %(name)s[%(process)d] %(levelname)s %(message)s")
    try:
        paths = ClusterPaths(args.workdir, args.cluster)
        node = Node(paths, args.node)
        # First thing: so `down` finds this process even if the launching CLI died.
        private_dir(node.paths.run)
        atomic_write(node.paths.pid_file, f"{os.getpid()}\n".encode())
    except (TestbedError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    _install_signal_handlers(node)
    return node.run()


if __name__ == "__main__":
    sys.exit(main())
