"""Property tests of the domain XML parser: hostile input raises VmferryError, cheaply."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.mutate import mutate
from vmferry.domain.xml import MAX_XML_BYTES, format_domain_xml, parse_domain_xml
from vmferry.errors import ErrorCode, VmferryError
from vmferry.testguest import guest_xml

VALID = guest_xml("fuzz", uuid="3e1a9c52-7b4d-4f0e-8a26-5c9d0b1e7f43")
FORMATTED = format_domain_xml(parse_domain_xml(VALID))

_chunk = st.text(max_size=30)
_FRAGMENTS = st.sampled_from(
    [
        "<vcpu>99999999999999999999</vcpu>",
        "<memory unit='EiB'>9</memory>",
        "<memory>nan</memory>",
        "<memory unit='KiB'>-1</memory>",
        "<uuid>not-a-uuid</uuid>",
        "<disk type='file'><source file='relative'/></disk>",
        "<serial type='pty'><target port='9999999999'/></serial>",
        "<graphics type='vnc' port='-7'/>",
        "<interface type='user'><mac address='zz'/></interface>",
        "<devices>",
        "</devices>",
        "<!--",
        "-->",
        "<![CDATA[x]]>",
        "&lt;",
        "&#0;",
        "&#x110000;",
        "\ud800",
        "\x00",
        "<a>" * 200,
        "</a>" * 200,
        "<!DOCTYPE domain [<!ENTITY x 'y'>]>",
        " xmlns='urn:x'",
        "9" * 5000,
    ]
)


@settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(data=st.data())
def test_mutated_domain_xml_raises_only_vmferry_errors(data: st.DataObject) -> None:
    base = data.draw(st.sampled_from([VALID, FORMATTED]))
    text = mutate(base, data, _chunk, max_edits=5, fragments=_FRAGMENTS)
    try:
        d = parse_domain_xml(text)
    except VmferryError as err:
        assert err.message and "Traceback" not in err.message
        return
    # whatever parses must format and parse back to the same definition
    assert parse_domain_xml(format_domain_xml(d)) == d


@settings(max_examples=300, deadline=None, derandomize=True)
@given(text=st.text(max_size=400))
def test_arbitrary_text_raises_only_vmferry_errors(text: str) -> None:
    with pytest.raises(VmferryError):
        parse_domain_xml(text)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        # refused by size before any parsing
        ("<domain type='kvm'>" + "<a>" * 200_000 + "</a>" * 200_000 + "</domain>", "larger than"),
        # parsed without recursion (no RecursionError, no stack overflow), then refused as a domain
        (
            "<domain type='kvm'><devices>" + "<x>" * 3000 + "</x>" * 3000 + "</devices></domain>",
            "missing element <name>",
        ),
        (
            VALID.replace("</domain>", "<!--" + "x" * (MAX_XML_BYTES + 1) + "--></domain>"),
            "larger than",
        ),
        (
            VALID.replace("</domain>", "<!--" + "é" * (MAX_XML_BYTES // 2 + 1) + "--></domain>"),
            "larger than",  # bytes, not characters
        ),
    ],
)
def test_huge_or_deep_input_refused_cheaply(text: str, words: str) -> None:
    # "cheaply": by the guard named in the message, not by a parser that went through it all
    with pytest.raises(VmferryError) as err:
        parse_domain_xml(text)
    assert err.value.code in (ErrorCode.XML_ERROR, ErrorCode.CONFIG_UNSUPPORTED)
    assert words in err.value.message
