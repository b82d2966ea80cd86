"""PII scrubbing: each kind on real-looking values, and the numbers that must survive (dates,
times, versions, ISBNs, hex literals, checksum failures, code)."""

from __future__ import annotations

import pytest

from ownlm.data.pii import luhn_valid, scrub_pii

POSITIVES = [
    ("email", "Write to jane.doe+news@example.co.uk for a copy.", "Write to <EMAIL> for a copy."),
    ("email", "Author: Sam Rushing <rushing@nightmare.com>", "Author: Sam Rushing <<EMAIL>>"),
    ("ip_address", "The server listens on 127.0.0.1 only.", "The server listens on <IP_ADDRESS> only."),
    ("ip_address", "Blocked 203.0.113.54, then 10.0.0.254.", "Blocked <IP_ADDRESS>, then <IP_ADDRESS>."),
    ("ip_address", "ssh admin@192.168.1.20", "ssh admin@<IP_ADDRESS>"),
    ("ip_address", "Bare 3.11.7.1 is a valid address.", "Bare <IP_ADDRESS> is a valid address."),
    ("ip_address", "ping 2001:0db8:85a3:0000:0000:8a2e:0370:7334", "ping <IP_ADDRESS>"),
    ("ip_address", "route via fe80::1%eth0 and 2001:db8::1", "route via <IP_ADDRESS> and <IP_ADDRESS>"),
    ("ip_address", "mapped ::ffff:192.0.2.1 here", "mapped <IP_ADDRESS> here"),
    ("credit_card", "Visa 4111 1111 1111 1111 exp 12/27", "Visa <CREDIT_CARD> exp 12/27"),
    ("credit_card", "card=4111-1111-1111-1111;", "card=<CREDIT_CARD>;"),
    ("credit_card", "MC 5555555555554444.", "MC <CREDIT_CARD>."),
    ("credit_card", "Amex 3782 822463 10005", "Amex <CREDIT_CARD>"),
    ("phone", "Call +1 (555) 123-4567 today.", "Call <PHONE> today."),
    ("phone", "London office: +44 20 7946 0958", "London office: <PHONE>"),
    ("phone", "Ruf an: +49 30 12345678.", "Ruf an: <PHONE>."),
    ("phone", "Appelez le 06 12 34 56 78 ou le +33 6 12 34 56 78.", "Appelez le <PHONE> ou le <PHONE>."),
    ("phone", "Tel. 020 7946 0958 or 0171/1234567", "Tel. <PHONE> or <PHONE>"),
    ("phone", "(808) 782-1557 that's my number", "<PHONE> that's my number"),
    ("phone", "call 555-123-4567 or 555.123.4567", "call <PHONE> or <PHONE>"),
]


@pytest.mark.parametrize(
    ("kind", "text", "expected"), POSITIVES, ids=[f"{p[0]}-{i}" for i, p in enumerate(POSITIVES)]
)
def test_scrubs(kind: str, text: str, expected: str) -> None:
    out, counts = scrub_pii(text)
    assert out == expected
    assert counts[kind] == expected.count(f"<{kind.upper()}>") and sum(counts.values()) == counts[kind]


NEGATIVES = [
    "Released on 2024-01-15 at 12:30:45, or 15.01.2024, or 01/15/2024, at 08:30.",
    "Requires Python 3.11.7 or version 1.2.3; see also 1.2.3 and 3.11.",
    "Python 3.11.7.1, version 1.2.3.4, pip install foo==2.0.0.1 and release 4.0.0.2 are versions.",
    'See sections "8.2.4.44" and § 7.1.1.1 of the spec; OID 1.3.6.1.4.1 and 999.1.1.1 and 01.02.03.04.',
    "ISBN 978-3-16-148410-0, ISBN 9780306406157 and ISBN-10 0-306-40615-2.",
    "addr = 0x7f000001  # loopback, in hex; mask 0xffffff00",
    "Order 4111 1111 1111 1112 fails the checksum; so does 1234567812345678.",
    "0000 0000 0000 0000 passes Luhn but is no card; 0101101001010 is a bit string.",
    "Population 1234567890, up from 1 234 567 in 1999 2000 2001.",
    "x[1::2], x[::1], std::vector, Add::add and a:b:c are code, not addresses.",
    "Times 10:30, 23:59:59; ratio 16:9; MAC-like aa:bb:cc:dd:ee:ff.",
    "@property\ndef host(self):  # decorator, not an e-mail\n    return user@localhost",
    "The score was 120 340 560 and the page 123-456-7890 of the archive.",
]


@pytest.mark.parametrize("text", NEGATIVES)
def test_leaves_lookalikes(text: str) -> None:
    assert scrub_pii(text) == (text, {"email": 0, "credit_card": 0, "ip_address": 0, "phone": 0})


def test_idempotent_and_counts_every_kind() -> None:
    text = "Mail a@b.io or +1 202 555 0173 from 8.8.8.8 with 4111111111111111."
    once, counts = scrub_pii(text)
    assert counts == {"email": 1, "credit_card": 1, "ip_address": 1, "phone": 1}
    assert scrub_pii(once) == (once, dict.fromkeys(counts, 0))


def test_public_ips_only_keeps_private_loopback_and_documentation_addresses() -> None:
    text = "lo 127.0.0.1, lan 10.1.2.3, doc 192.0.2.7 and 2001:db8::1, dns 8.8.8.8 and 2606:4700::1111"
    out, counts = scrub_pii(text, public_ips_only=True)
    assert (
        out == "lo 127.0.0.1, lan 10.1.2.3, doc 192.0.2.7 and 2001:db8::1, dns <IP_ADDRESS> and <IP_ADDRESS>"
    )
    assert counts["ip_address"] == 2


@pytest.mark.parametrize(
    ("digits", "ok"),
    [
        ("4111111111111111", True),
        ("378282246310005", True),
        ("79927398713", True),
        ("4111111111111112", False),
    ],
)
def test_luhn(digits: str, ok: bool) -> None:
    assert luhn_valid(digits) is ok
