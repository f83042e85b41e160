"""Strict integers in every document format: evidence JSON, agent frames, policies, cluster
specs and image recipes all decode integers through encoding.require_int, so 1.0, true and
"1" are refused alike, with a message naming the field and the type given."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from attestation.agent_wire import parse_quote_request
from attestation.encoding import describe_value, require_int
from attestation.errors import EvidenceFormatError, PolicyError
from attestation.evidence import Evidence
from attestation.policy import load_policy
from attestation.tpm_types import PcrSelection, marshal_pcr_selection, tpm2b
from testbed.spec.cluster_spec import ClusterSpecError, parse_cluster_spec
from testbed.spec.recipe import DEFAULT_RECIPE, RecipeError, parse_recipe

NOT_ONE = [(1.0, "a float 1.0"), (True, "a boolean true"), ("1", "a string '1'"),
           (None, "nothing (null)"), ([1], "a list"), ({"1": 1}, "a mapping"),
           (2, "the integer 2")]
NOT_ONE_IDS = ["float", "bool", "string", "null", "list", "mapping", "two"]


def _evidence_doc() -> dict[str, object]:
    selection = marshal_pcr_selection((PcrSelection("sha256", (0,)),))
    attest = (struct.pack(">IH", 0xFF544347, 0x8018) + tpm2b(b"") + tpm2b(b"n")
              + struct.pack(">QIIBQ", 1, 1, 0, 1, 0) + selection + tpm2b(bytes(32)))
    return Evidence(attest=attest, signature=b"s", ak_public=b"k", pcr_bank="sha256",
                    pcrs={0: bytes(32)}).to_dict()


@pytest.mark.parametrize(("value", "described"), NOT_ONE, ids=NOT_ONE_IDS)
def test_evidence_version_must_be_the_integer_1(value: object, described: str) -> None:
    doc = _evidence_doc()
    doc["version"] = value
    with pytest.raises(EvidenceFormatError) as caught:
        Evidence.from_json(json.dumps(doc).encode())
    assert str(caught.value) == f"evidence version: must be the integer 1, got {described}"


def test_evidence_format_names_what_was_given() -> None:
    doc = _evidence_doc()
    doc["format"] = 7
    with pytest.raises(EvidenceFormatError, match="format: must be 'tpm2-evidence', got the "
                                                  "integer 7"):
        Evidence.from_dict(doc)


@pytest.mark.parametrize(("value", "described"), NOT_ONE, ids=NOT_ONE_IDS)
def test_policy_version_must_be_the_integer_1(value: object, described: str) -> None:
    text = yaml.safe_dump({"version": value, "name": "p", "pcrs": {0: "00" * 32}})
    if value is None:
        described = "missing"
    with pytest.raises(PolicyError, match=f"^version: .*{described}"):
        load_policy(text)


@pytest.mark.parametrize(("value", "described"), NOT_ONE, ids=NOT_ONE_IDS)
def test_spec_version_must_be_the_integer_1(value: object, described: str) -> None:
    text = yaml.safe_dump({"version": value, "name": "c",
                           "nodes": [{"name": "a", "role": "server"}]})
    with pytest.raises(ClusterSpecError) as caught:
        parse_cluster_spec(text, Path("."))
    assert str(caught.value) == f"version: must be the integer 1, got {described}"


@pytest.mark.parametrize(("value", "described"), NOT_ONE, ids=NOT_ONE_IDS)
def test_recipe_version_must_be_the_integer_1(value: object, described: str) -> None:
    doc = yaml.safe_load(DEFAULT_RECIPE.read_text())
    doc["version"] = value
    with pytest.raises(RecipeError) as caught:
        parse_recipe(doc)
    assert str(caught.value) == f"version: must be the integer 1, got {described}"


@pytest.mark.parametrize("port", [True, 22.0, "22", 0, 65536])
def test_recipe_agent_port_is_a_strict_integer(port: object) -> None:
    doc = yaml.safe_load(DEFAULT_RECIPE.read_text())
    doc["agent_port"] = port
    with pytest.raises(RecipeError, match=r"^agent_port: must be an integer 1\.\.65535, got"):
        parse_recipe(doc)


@pytest.mark.parametrize(("pcrs", "message"), [
    ([0, True], "pcrs[1]: PCR index must be an integer 0..23, got a boolean true"),
    ([0.0], "pcrs[0]: PCR index must be an integer 0..23, got a float 0.0"),
    (["1"], "pcrs[0]: PCR index must be an integer 0..23, got a string '1'"),
    ([24], "pcrs[0]: PCR index must be an integer 0..23, got the integer 24"),
])
def test_quote_request_pcrs_are_strict_integers(pcrs: list[object], message: str) -> None:
    with pytest.raises(EvidenceFormatError) as caught:
        parse_quote_request({"op": "quote", "nonce": "01", "pcrs": pcrs})
    assert str(caught.value) == message


@given(value=st.none() | st.booleans() | st.floats() | st.text(max_size=50)
       | st.integers() | st.lists(st.integers(), max_size=3))
def test_require_int_accepts_exactly_ints_in_range(value: object) -> None:
    try:
        got = require_int(value, "f", PolicyError, minimum=0, maximum=23)
    except PolicyError as exc:
        assert str(exc).startswith("f: must be an integer 0..23, got ")
        assert describe_value(value) in str(exc)
    else:
        assert type(value) is int and got == value and 0 <= got <= 23


@pytest.mark.parametrize("key", ["²", "٤", "00", "+1", " 1", "32", "-0"])
def test_evidence_pcr_keys_are_canonical_decimal(key: str) -> None:
    doc = _evidence_doc()
    doc["pcrs"] = {key: "00" * 32}
    with pytest.raises(EvidenceFormatError, match=r"is not a PCR index 0\.\.31"):
        Evidence.from_dict(doc)


@pytest.mark.parametrize("name", ["EV_UNKNOWN_0x+1", "EV_UNKNOWN_0x 1", "EV_UNKNOWN_0x1_0",
                                  "EV_UNKNOWN_0x", "EV_UNKNOWN_0x123456789"])
def test_unknown_event_type_names_are_hex_only(name: str) -> None:
    text = yaml.safe_dump({"version": 1, "name": "p",
                           "events": [{"pcr": 4, "type": name, "digest": "00" * 32}]})
    with pytest.raises(PolicyError, match="is not an event type"):
        load_policy(text)
