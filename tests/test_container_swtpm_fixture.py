"""What a downstream project's CI does with the `swtpm` pytest fixture (docs/labs.md):
with this package installed, the fixtures are there without any import or conftest.
The container test (tests/test_container_ci.py) runs this file inside the CI image
through `sh .ci/test`, so it also shows swtpm, tpm2-tools and tpm2-pytss working there."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

from tpm2_pytss import ESAPI, TCTILdr


def test_swtpm_fixture_answers_esapi(swtpm: Any) -> None:
    esapi = ESAPI(TCTILdr("swtpm", swtpm.tcti_conf))
    try:
        assert len(bytes(esapi.get_random(8))) == 8
    finally:
        esapi.close()


def test_swtpm_fixture_answers_tpm2_tools(swtpm: Any) -> None:
    tool = shutil.which("tpm2_getrandom")
    assert tool is not None, "tpm2-tools missing: run `sh .ci/bootstrap`"
    out = subprocess.run([tool, "-T", swtpm.tcti, "--hex", "16"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    assert len(bytes.fromhex(out.strip())) == 16
