"""Which PCR banks a TPM has active (TPM2_GetCapability, TPM_CAP_PCRS).

A quote or PCR read of an inactive bank comes back with an empty selection; asking
first turns that into an error that names the bank and the ones the TPM has.
"""

from __future__ import annotations

from tpm2_pytss.constants import TPM2_CAP

from attestation.tpm import TpmClient
from attestation.tpm_types import HASH_BY_ALG, PcrSelection
from testbed.core.errors import ArgumentError

__all__ = ["active_banks", "require_bank"]


def active_banks(client: TpmClient) -> tuple[str, ...]:
    """Banks with at least one PCR allocated, by name (banks we cannot name are left out)."""
    _, data = client.esapi.get_capability(TPM2_CAP.PCRS, 0, 1)
    banks = []
    for selection in data.data.assignedPCR:
        allocated = any(bytes(selection.pcrSelect)[: selection.sizeofSelect])
        name = HASH_BY_ALG.get(int(selection.hash))
        if allocated and name is not None:
            banks.append(name)
    return tuple(banks)


def require_bank(client: TpmClient, selection: PcrSelection) -> None:
    """Refuse a selection whose bank the TPM does not have active (a bad -l value)."""
    banks = active_banks(client)
    if selection.bank not in banks:
        raise ArgumentError(
            f"PCR bank {selection.bank} is not active on this TPM (active: "
            f"{', '.join(banks) or 'none'}); choose one of them with -l, e.g. "
            f"-l {banks[0] if banks else 'sha256'}:0-7")
