"""A vTPM's certificate tool, run ON a host by ``swtpm_setup`` (its ``create_certs_tool``).

``swtpm_setup`` calls it with ``--type ek --ek MODULUS --dir OUT`` and the TPM's
identity; it writes the request to ``EXCHANGE/ek-request.json`` and waits for the lab
(:func:`testbed.hosts.placement.manufacture_vtpm`, over SFTP) to put the certificate at
``EXCHANGE/ek.cert`` (or ``EXCHANGE/refused``), then hands it to ``swtpm_setup`` as
``OUT/ek.cert``. No key of any CA is on the host. Only EK certificates are asked for.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from testbed.hosts.ekcert import EkRequest

__all__ = ["REFUSED", "REQUEST", "RESPONSE", "main"]

REQUEST, RESPONSE, REFUSED = "ek-request.json", "ek.cert", "refused"
WAIT_S = 60.0
_IDENTITY = ("tpm-spec-family", "tpm-spec-level", "tpm-spec-revision", "tpm-manufacturer",
             "tpm-model", "tpm-version")


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m testbed.hosts.vtpm_tool")
    parser.add_argument("--exchange", required=True, type=Path)
    parser.add_argument("--type", required=True)
    parser.add_argument("--ek", default="")
    parser.add_argument("--dir", required=True, type=Path)
    for name in _IDENTITY:
        parser.add_argument(f"--{name}", default="")
    args, _rest = parser.parse_known_args(argv)  # --tpm2, --configfile, --optsfile ...
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.type != "ek":
        print(f"vtpm_tool: only EK certificates are issued (asked for {args.type})",
              file=sys.stderr)
        return 1
    identity = tuple((name, str(getattr(args, name.replace("-", "_")))) for name in _IDENTITY)
    part = args.exchange / (REQUEST + ".part")
    part.write_bytes(EkRequest(args.ek, identity).to_json())
    os.replace(part, args.exchange / REQUEST)  # the lab sees a whole request or none
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if (args.exchange / REFUSED).exists():
            print("vtpm_tool: the lab refused the EK certificate request", file=sys.stderr)
            return 1
        if (args.exchange / RESPONSE).exists():
            shutil.copyfile(args.exchange / RESPONSE, args.dir / "ek.cert")
            return 0
        time.sleep(0.05)
    print(f"vtpm_tool: no EK certificate from the lab within {WAIT_S:.0f} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
