"""Guest-side encrypted disks (docs/svd.md): the node unlocks its own disks.

**CryptoVM side** (:func:`testbed.roles.cryptovm.grant_guest_disks`, when a node's
attested session starts): for each of that node's ``mode: guest`` disks in the cluster
spec, the disk key exists (created inside the CryptoVM as root, with the node's release
policy) and the node's account ``node.<name>`` may read its public key and ask for its
release. The release itself stays attestation-gated (:mod:`cryptovm.release`): the
privilege only admits the request.

**Node side** (:func:`unlock_guest_disks`, agent op ``role`` action ``svd_unlock``,
sent by ``testbed up`` once the node attested): the node opens a Trusted Passages
channel to the CryptoVM node (each side verifies the other's attestation), asks for the
key with a fresh quote of its own TPM that binds a recipient key it made for this
request, and opens the disk with its own qemu-storage-daemon. The passphrase exists
only in the node process and in its daemon: the host (the backend, the CLI) never
holds it. On first use the node formats the disk itself, wrapping a fresh passphrase
under the key's public key.
"""

from __future__ import annotations

import logging
from typing import Any

from attestation.errors import TestbedError
from cryptovm.attested import StreamClient
from cryptovm.disks import disk_key_id
from testbed.core.errors import StateError
from testbed.roles.base import NodeContext
from testbed.roles.cryptovm import published_service
from testbed.roles.trust import HOST, PROFILE, ClusterValidator, NodeIssuer, cluster_tls_ca
from testbed.spec.cluster_spec import DiskSpec
from testbed.svd.volumes import DiskFiles, attach
from testbed.tpm.boot import SIM_PCRS
from trusted_passages import ChannelConfig, connect
from trusted_passages.pki import generate_key, issue_certificate

__all__ = ["UNLOCK_ACTION", "unlock_guest_disks"]

UNLOCK_ACTION = "svd_unlock"
log = logging.getLogger("testbed.roles.disks")


def _bootstrap(ctx: NodeContext, cryptovm: str) -> ChannelConfig:
    """The node's cluster-CA identity, quoting through its TPM, expecting the CryptoVM."""
    key = generate_key(PROFILE)
    ca = cluster_tls_ca(ctx.cluster_paths)
    return ChannelConfig(certificate=issue_certificate(ca, ctx.name, key), private_key=key,
                         ca_certificates=[ca.certificate], issuer=NodeIssuer(ctx),
                         validator=ClusterValidator(ctx.cluster_paths, ctx.revocations),
                         profile=PROFILE, timeout=10.0, expected_peer=cryptovm)


def unlock_guest_disks(ctx: NodeContext) -> dict[str, Any]:
    """Unlock (or first provision) every guest-mode disk of this node."""
    disks = [d for d in ctx.spec.disks if d.mode == "guest"]
    if not disks:
        return {"disks": []}
    cryptovm = next((n.name for n in ctx.cluster.nodes if n.role == "cryptovm"), None)
    if cryptovm is None:
        raise StateError("guest disks need a cryptovm node in the cluster")
    port = published_service(ctx.cluster_paths, cryptovm).tp_port
    if port is None:
        raise StateError(f"CryptoVM node {cryptovm!r} has no listener for attested nodes")
    try:
        with connect(HOST, port, _bootstrap(ctx, cryptovm)) as channel:
            vsm = StreamClient(channel.recv, channel.send)
            unlocked = [_unlock(ctx, vsm, cryptovm, disk) for disk in disks]
    except TestbedError as exc:
        raise StateError(f"node {ctx.name}: guest disk not unlocked: {exc}") from None
    return {"disks": unlocked}


def _unlock(ctx: NodeContext, vsm: StreamClient, cryptovm: str, disk: DiskSpec
            ) -> dict[str, Any]:
    key_id = disk_key_id(ctx.name, disk.name)

    def public_key() -> bytes:
        return bytes(vsm.call("public_key", key_id=key_id)["public_key"])

    files = DiskFiles(ctx.name, disk.name, ctx.paths.state, ctx.paths.run)
    status = attach(files, disk, cryptovm, vsm.call, lambda data: ctx.quote(data, SIM_PCRS),
                    public_key)
    log.info("guest disk %s unlocked by the node itself", disk.name)
    return status.to_dict()
