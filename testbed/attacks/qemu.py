"""``testbed attack --backend qemu``: the attack lab's scenarios that real VMs show.

``tampered-boot``: a real VM booted with another kernel command line fails attestation,
with the diverging PCR 9 event named. Two VMs of the same guest image boot in parallel:
an honest one (the baseline: it must be accepted, which shows the policy is right) and
one whose command line has ``init=/bin/sh`` appended. Both are verified against the
policy predicted from the image and its *honest* command line. Without attestation
nothing tells them apart: the tampered VM boots and its agent answers like the honest one.

``runtime-tamper``: the honest VM (no other VM is booted for it) serves a customer over
an attested Trusted Passages channel, then executes a binary its runtime policy does not
list. The verifier's next quote catches it (check ``runtime``), and its signed revocation
makes the customer close the channel. The customer is a guest agent on the host (the
image's agent under Debian's python3, with its own swtpm and a measured boot, as in
tests/test_qemu_guest_tp.py): a second VM would cost another TCG boot.

Everything is torn down at the end (:class:`~testbed.qemu.vms.VmDriver`'s close, the
customer's process and swtpm).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attestation.encoding import b64encode
from attestation.errors import TestbedError, VerificationError
from attestation.ima import IMA_PCR
from attestation.policy import ReferencePolicy, dump_policy
from attestation.registrar import AkRegistry, register
from attestation.report import VerificationReport
from attestation.tpm import TpmClient
from attestation.verifier import QuoteVerifier
from testbed.attacks.scenarios import Outcome, ScenarioResult
from testbed.cluster.agent import AgentClient, TcpTransport
from testbed.cluster.runtime import check_runtime, quoting_pcr10
from testbed.core.clock import utc_now
from testbed.core.errors import StateError
from testbed.core.paths import ClusterPaths
from testbed.core.progress import Progress
from testbed.qemu.domain import free_port
from testbed.qemu.image.build import build_image, image_cache
from testbed.qemu.predict.events import QUOTED_PCRS
from testbed.qemu.predict.runtime import vm_runtime_policy
from testbed.qemu.relay import HeldChannel, configure_guest, hold_channel
from testbed.qemu.vms import QemuNode, VmDriver
from testbed.roles.revocation import (
    RevocationEvent,
    decision_args,
    encode_decision,
    public_key_pem,
)
from testbed.spec.cluster_spec import BootSpec
from testbed.spec.recipe import load_recipe
from testbed.tpm.boot import SIM_PCRS, measure_boot, predicted_policy
from testbed.tpm.localca import LocalCA
from testbed.tpm.swtpm import Swtpm, provision
from trusted_passages.pki import make_ca

__all__ = ["QEMU_SCENARIOS", "TAMPER", "QemuAttack", "run_qemu_attacks", "tampered_boot"]

QEMU_SCENARIOS = ("tampered-boot", "runtime-tamper")
TAMPER = " init=/bin/sh"
"""Appended to the command line: a root shell as init (an initramfs boot ignores it,
so the VM still comes up and answers; the point is what the firmware measured)."""
UNLISTED = "/usr/local/bin/cryptominer"  # what the server executes after it attested
CUSTOMER = "customer"
CUSTOMER_BOOT = BootSpec.from_content("OVMF", "vmlinuz", "initrd",
                                      "console=ttyS0 panic=-1 quiet")
GUEST_PYTHON = "/usr/bin/python3"  # Debian's: the guest image's package versions
REPO = Path(__file__).resolve().parents[2]
CHANNEL_TIMEOUT_S = 120.0  # two quotes and validations, one of them inside a TCG guest


class QemuAttack:
    """The outcome of one qemu attack run, in the attack lab's result shape."""

    def __init__(self, results: list[ScenarioResult], baseline: VerificationReport,
                 details: dict[str, object]) -> None:
        self.results = results
        self.baseline = baseline
        self.details = details

    @property
    def ok(self) -> bool:
        """The honest VM was accepted and every attack caught."""
        return self.baseline.ok and all(r.as_expected for r in self.results)


def tampered_boot(workdir: Path, *, progress: Progress | None = None) -> QemuAttack:
    return run_qemu_attacks(workdir, ["tampered-boot"], progress=progress)


def run_qemu_attacks(workdir: Path, names: Sequence[str], *,
                     progress: Progress | None = None) -> QemuAttack:
    """Boot the VMs ``names`` need (one honest VM, plus the tampered one for
    tampered-boot) and run the scenarios against them."""
    progress = progress or Progress(quiet=True)
    progress.expect(4 + len(names))
    cache = image_cache(workdir)
    with progress.step("guest image (built once, then cached)"):
        image = build_image(cache)
    with VmDriver(workdir, reference_dir=cache / "firmware") as driver, \
            contextlib.ExitStack() as stack:
        with progress.step("policy predicted from the image and its honest command line"):
            policy = driver.predicted_policy(image)
        tag = f"atk{os.getpid()}"  # unique domain names: other runs may be booting VMs too
        started = time.monotonic()
        tampering = "tampered-boot" in names
        with progress.step(f"booting {'two VMs in parallel' if tampering else 'a VM'} "
                           f"({driver.accel.accel}): honest"
                           + (f", and tampered (command line + {TAMPER.strip()!r})"
                              if tampering else "")):
            honest = driver.boot(f"{tag}-honest", image)
            booted = [honest]
            if tampering:
                booted.append(driver.boot(f"{tag}-tampered", image,
                                          cmdline=image.cmdline + TAMPER))
            customer = (stack.enter_context(_customer(driver.ca))
                        if "runtime-tamper" in names else None)
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                list(pool.map(driver.wait, booted))
        with progress.step("attesting the honest VM against the predicted policy"):
            base_report = driver.attest(honest, policy)[0]
        results = []
        for name in names:
            with progress.step(f"attack: {name}"):
                if name == "tampered-boot":
                    results.append(_tampered_boot(driver, booted[1], policy))
                else:
                    assert customer is not None
                    results.append(runtime_tamper(driver, honest, policy, customer,
                                                  workdir))
        details = _details(driver, booted, time.monotonic() - started)
    return QemuAttack(results, base_report, details)


def _tampered_boot(driver: VmDriver, tampered: QemuNode, policy: ReferencePolicy
                   ) -> ScenarioResult:
    report = driver.attest(tampered, policy)[0]
    booted = tampered.status.get("kernel_cmdline", tampered.cmdline)
    without = Outcome(True, f"the VM booted {booted!r} and its agent answered like the honest "
                            "one: without attestation nothing tells them apart")
    failure = report.failure
    caught = Outcome(report.ok, failure.detail if failure else "the tampered VM was ACCEPTED",
                     failure.name if failure else None, "verifier (host)" if failure else None)
    return ScenarioResult("tampered-boot", "Tampered boot: a real VM booted with another kernel "
                          "command line (PCR 9)", without, caught)


# --- runtime-tamper ---------------------------------------------------------------------


@dataclass
class Customer:
    """The customer: the guest agent on the host, its own swtpm and a measured boot."""

    agent: AgentClient
    process: subprocess.Popen[bytes]
    log: Path


@contextlib.contextmanager
def _customer(ca: LocalCA) -> Iterator[Customer]:
    directory = Path(tempfile.mkdtemp(prefix="atk-customer-"))  # short: swtpm's socket
    swtpm: Swtpm | None = None
    process: subprocess.Popen[bytes] | None = None
    try:
        provision(directory / "tpm", ca)
        swtpm = Swtpm(directory / "tpm").start()
        with TpmClient(swtpm.tcti) as client:
            (directory / "eventlog").write_bytes(measure_boot(client, CUSTOMER_BOOT))
        port, log = free_port(), directory / "agent.log"
        env = {key: value for key, value in os.environ.items() if key != "VIRTUAL_ENV"}
        with log.open("wb") as out:
            process = subprocess.Popen(
                [GUEST_PYTHON, "-u", str(REPO / "testbed/qemu/guest/agent.py"), "--listen",
                 f"127.0.0.1:{port}", "--tpm", f"unix:{swtpm.socket_path}", "--event-log",
                 str(directory / "eventlog"), "--node", CUSTOMER],
                stdout=out, stderr=subprocess.STDOUT, env={**env, "PYTHONPATH": str(REPO)},
                cwd=directory)
        yield Customer(_wait_listening(port, process, log), process, log)
    finally:
        if process is not None:
            process.kill()
            process.wait(10)
        if swtpm is not None:
            swtpm.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _wait_listening(port: int, process: subprocess.Popen[bytes], log: Path) -> AgentClient:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and process.poll() is None:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return AgentClient(TcpTransport(port), node=CUSTOMER, timeout=60)
        time.sleep(0.1)
    raise StateError(f"the customer's guest agent ({GUEST_PYTHON}) did not start: "
                     f"{log.read_text(errors='replace')[-1500:]}; Debian's python3-openssl "
                     "and python3-cryptography are needed: run .ci/bootstrap")


def runtime_tamper(driver: VmDriver, server: QemuNode, policy: ReferencePolicy,
                   customer: Customer, workdir: Path) -> ScenarioResult:
    """The server VM, attested (runtime included) and holding a channel to its customer,
    executes an unlisted binary; the verifier catches it and revokes it."""
    verifier = _RuntimeVerifier(driver, server, policy, workdir)
    verifier.judge()  # the server attested: the verifier's state records its PCR 10
    key = Ed25519PrivateKey.generate()
    _provision_channel(driver, server, policy, customer, key)
    held = hold_channel(customer.agent, server.agent, server_node=server.name,
                        message="hello Bob")
    try:
        _wait_open(customer, server.name, held)
        server.agent.call({"op": "runtime_measure", "path": UNLISTED,
                           "content": b64encode(b"an unlisted binary")})
        still_open = _open(customer) == {server.name: 1}
        plain = Outcome(still_open, f"the VM executed {UNLISTED} and its customer's channel "
                        "stayed open: nothing in the session sees what the server runs")
        tp = _revoke_on_failure(verifier, customer, held, key)
    finally:
        held.close()
        verifier.close()
    return ScenarioResult("runtime-tamper", "Runtime tamper: a real VM executes an unlisted "
                          "binary after attestation", plain, tp)


class _RuntimeVerifier:
    """The host verifier's runtime check of one VM (its state in a private directory)."""

    def __init__(self, driver: VmDriver, server: QemuNode, policy: ReferencePolicy,
                 workdir: Path) -> None:
        self._driver, self._server = driver, server
        self._policy = quoting_pcr10(policy)
        self._runtime = vm_runtime_policy(server.name, load_recipe())
        self._directory = Path(tempfile.mkdtemp(prefix="atk-verifier-", dir=workdir))
        self._paths = ClusterPaths(self._directory, "qemu-attack")

    def judge(self) -> str:
        """Quote PCRs 0-10, verify, run the incremental runtime check; raise on failure."""
        nonce = os.urandom(32)
        evidence = self._server.agent.quote(nonce, [*QUOTED_PCRS, IMA_PCR])
        QuoteVerifier(ak_trust=self._driver.registrar, policy=self._policy) \
            .verify(evidence, nonce).raise_for_failure()
        return check_runtime(self._paths, self._server.name, self._server.agent, evidence,
                             self._runtime)

    def close(self) -> None:
        shutil.rmtree(self._directory, ignore_errors=True)


def _provision_channel(driver: VmDriver, server: QemuNode, policy: ReferencePolicy,
                       customer: Customer, key: Ed25519PrivateKey) -> None:
    """Both guests get TLS keys certified, the AK registry, each other's policy, and the
    customer the verifier's key (as `testbed up` gives a VM's agent)."""
    registry = AkRegistry()
    for node, agent in ((server.name, server.agent), (CUSTOMER, customer.agent)):
        ak = register(agent, node, driver.registrar, AkRegistry())
        assert ak is not None  # a fresh registry: always activated
        registry.add(node, ak)
    ca = make_ca("attack lab TLS CA")
    policies = {server.name: dump_policy(policy),
                CUSTOMER: dump_policy(predicted_policy(CUSTOMER, CUSTOMER_BOOT))}
    for node, agent, pcrs in ((server.name, server.agent, QUOTED_PCRS),
                              (CUSTOMER, customer.agent, SIM_PCRS.indices)):
        configure_guest(agent, node, ca, registry_json=registry.to_json(), policies=policies,
                        pcrs=list(pcrs))
    customer.agent.call({"op": "revocation_key", "public_key": public_key_pem(
        key.public_key())})


def _open(customer: Customer) -> dict[str, int]:
    opened = customer.agent.call({"op": "tp_open"}).get("open")
    return opened if isinstance(opened, dict) else {}


def _wait_open(customer: Customer, server: str, held: HeldChannel) -> None:
    deadline = time.monotonic() + CHANNEL_TIMEOUT_S
    while _open(customer) != {server: 1}:
        if time.monotonic() > deadline or not held.relay.is_alive():
            views = held.views()
            raise StateError(f"the customer's channel to {server} did not open: "
                             f"{views[0].get('error') or views[1].get('error')}")
        time.sleep(0.1)


def _revoke_on_failure(verifier: _RuntimeVerifier, customer: Customer, held: HeldChannel,
                       key: Ed25519PrivateKey) -> Outcome:
    """The verifier's next quote; on a failure, its signed revocation to the customer."""
    try:
        verifier.judge()
    except VerificationError as exc:
        caught = exc
    else:
        return Outcome(True, "the verifier's runtime check passed")
    event = RevocationEvent(held.server.node, caught.check, caught.reason[:1000], utc_now(), 1)
    started = time.monotonic()
    try:
        customer.agent.role("revoked", decision_args(event, key.sign(encode_decision(event))))
    except TestbedError as exc:
        return Outcome(True, f"{caught.reason}; the customer refused the revocation: {exc}")
    closed = held.wait_closed(5.0)
    ms = (time.monotonic() - started) * 1000
    ended = held.views()[0].get("ended") if closed else None
    if ended != "revoked":
        return Outcome(True, f"{caught.reason}; but the customer's channel stayed open")
    return Outcome(False, f"{caught.reason}; revoked: the customer closed its channel to the "
                   f"VM {ms:.0f} ms after the signed decision", caught.check,
                   "verifier (host)")


def _details(driver: VmDriver, booted: list[QemuNode], seconds: float) -> dict[str, object]:
    names = ("honest", "tampered")
    return {"accel": driver.accel.accel, "accel_reason": driver.accel.reason,
            **{f"{label}_cmdline": node.cmdline for label, node in zip(names, booted,
                                                                         strict=False)},
            "boot_seconds": {label: round(node.boot_seconds or 0, 1)
                             for label, node in zip(names, booted, strict=False)},
            "seconds": round(seconds, 1)}
