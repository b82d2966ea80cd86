"""PII scrubbing: e-mail addresses, phone numbers, IP addresses and payment card numbers.

A language model memorises rare strings it sees in training and can repeat them (Carlini et al.
2021, "Extracting Training Data from Large Language Models"), so contact details and card numbers
are replaced by placeholders before tokenization, as BigScience ROOTS, StarCoder and FineWeb do
(FineWeb replaces e-mails and public IPs; StarCoder's pipeline adds keys and names with a model).
Regexes cannot find names or addresses; these four kinds have a shape a regex can check.

The hard part is precision: numbers are everywhere (dates, times, versions, ISBNs, hex literals,
tables), so every pattern is anchored to what sits on either side of it, and each candidate is then
validated in Python:

- IP addresses: `ipaddress` decides (octets 0-255, no leading zeros; real IPv6 grammar). "1.2.3"
  has three parts and is never an address. A four-part dotted number such as "3.11.7.1" is a valid
  IPv4 address and is scrubbed, unless the words just before it say it is a version ("Python",
  "version", "v", "release", "build", "==", ...): leaking an address costs more than masking a
  rare bare four-part version. IPv6 needs a digit and either three groups or a four-digit first
  group, so C++ `Add::add` and Python `x[1::2]` stay.
- Cards: 13-19 digits, in one run or in the groupings printed on cards (4-4-4-4[-3], Amex 4-6-5,
  Diners 4-6-4), passing the Luhn checksum (ISO/IEC 7812-1) and starting with 2-6, the first digit
  of the major networks (Mastercard 2/5, Amex/Diners/JCB 3, Visa 4, Discover/UnionPay/Maestro 6).
  A random digit run passes Luhn one time in ten; the first digit also keeps ISBN-13s (978/979...)
  and bit strings.
- Phones: three shapes only: international ("+" country code, ITU-T E.164 allows 15 digits at
  most), North American ("(555) 123-4567"; NANP area codes start 2-9), and European national with
  a trunk "0", at least one separator and 9+ digits ("020 7946 0958", "06 12 34 56 78"). A plain
  integer, a date ("2024-01-15", "15.01.2024"), a time or a version matches none of them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

PLACEHOLDERS = {
    "email": "<EMAIL>",
    "credit_card": "<CREDIT_CARD>",
    "ip_address": "<IP_ADDRESS>",
    "phone": "<PHONE>",
}

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,24}\b"
)
_CARD = re.compile(
    r"(?<![\w.+-])(?:\d{13,19}"
    r"|\d{4}([ -])\d{4}\1\d{4}\1\d{1,4}(?:\1\d{1,3})?"
    r"|\d{4}([ -])\d{6}\2\d{4,5})"
    r"(?![\w-]|[.,]\d)"
)
_IPV6 = re.compile(
    r"(?<![\w:.])(?=[0-9A-Fa-f]*:[0-9A-Fa-f]*:)[0-9A-Fa-f:]+(?:\d{1,3}(?:\.\d{1,3}){3})?(?:%[\w.]+)?"
    r"(?![\w:]|\.\d)"
)
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")  # a sentence's final "." may follow
_VERSION_CONTEXT = re.compile(
    r"(?:\bversions?|\bver\.?|\bv|\brelease[sd]?|\bbuild|\bpython|\bsections?|§|==|>=|<=|~=|!=)[\s\"'#:=(-]*$",
    re.IGNORECASE,
)
_PHONE = re.compile(
    r"(?<![\w+./-])(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,8}){1,5}"  # international
    r"|(?:\([2-9]\d{2}\) ?|[2-9]\d{2}[ .-])\d{3}[ .-]\d{4}"  # North American
    r"|(?:\(0\d{1,4}\)|0\d{1,4})[ /.-]\d{2,8}(?:[ .-]\d{2,8}){0,4}"  # European national, trunk 0
    r")(?![\w-]|[.,/:]\d)"
)
_DATE = re.compile(r"\d{1,4}([./-])\d{1,2}\1\d{1,4}")
_NON_DIGIT = re.compile(r"\D")


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) checksum of a string of digits, as on every payment card."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(m: re.Match[str], public_ips_only: bool) -> bool:
    digits = _NON_DIGIT.sub("", m.group())
    # 0000 0000 0000 0000 passes Luhn, and no major network's numbers start with 0, 1, 7, 8 or 9.
    if digits[0] not in "23456" or len(set(digits)) == 1:
        return False
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def _ipv6(m: re.Match[str], public_ips_only: bool) -> bool:
    text = m.group().split("%", 1)[0]
    try:
        addr = ipaddress.IPv6Address(text)
    except ValueError:
        return False
    groups = [g for g in re.split(r"[:.]", text) if g]
    shaped = any(c.isdigit() for c in text) and (len(groups) >= 3 or len(groups[0]) == 4)
    return shaped and (addr.is_global or not public_ips_only)


def _ipv4(m: re.Match[str], public_ips_only: bool) -> bool:
    try:
        addr = ipaddress.IPv4Address(m.group())
    except ValueError:
        return False
    if public_ips_only and not addr.is_global:
        return False
    return not _VERSION_CONTEXT.search(m.string, max(0, m.start() - 24), m.start())


def _phone(m: re.Match[str], public_ips_only: bool) -> bool:
    text = m.group()
    # National numbers written with a trunk 0 have 9+ digits in Europe (ES 9, IT 9-11, FR/NL 10,
    # UK 10-11, DE 10-12); 8 digits after a 0 ("01.02.03.04") is more likely a list or a date.
    least = 9 if text.startswith(("0", "(0")) else 8
    return least <= len(_NON_DIGIT.sub("", text)) <= 15 and not _DATE.fullmatch(text)


# Order matters: an e-mail's digits must not become a phone, a card's groups must not either, and
# an IPv4 address would otherwise read as a dotted phone number.
_KINDS: tuple[tuple[str, re.Pattern[str], Callable[[re.Match[str], bool], bool] | None, str], ...] = (
    ("email", _EMAIL, None, "@"),
    ("credit_card", _CARD, _card, ""),
    ("ip_address", _IPV6, _ipv6, ":"),
    ("ip_address", _IPV4, _ipv4, "."),
    ("phone", _PHONE, _phone, ""),
)


def scrub_pii(text: str, *, public_ips_only: bool = False) -> tuple[str, dict[str, int]]:
    """Replace e-mails, card numbers, IP addresses and phone numbers by placeholders ("<EMAIL>",
    "<CREDIT_CARD>", "<IP_ADDRESS>", "<PHONE>"); returns (text, {kind: number replaced}) with every
    kind present. Idempotent: placeholders match nothing.

    `public_ips_only` keeps private, loopback and documentation addresses (10.0.0.1, 127.0.0.1,
    192.0.2.1, 2001:db8::1), as FineWeb's PII formatter does: they identify no one, and technical
    text is full of them. Off by default: every valid address is scrubbed."""
    counts = dict.fromkeys(PLACEHOLDERS, 0)
    for kind, pattern, valid, needs in _KINDS:
        if needs and needs not in text:  # most documents hold no "@": skip the scan
            continue
        placeholder = PLACEHOLDERS[kind]

        def sub(m: re.Match[str], kind: str = kind, valid=valid, placeholder: str = placeholder) -> str:
            if valid is not None and not valid(m, public_ips_only):
                return m.group()
            counts[kind] += 1
            return placeholder

        text = pattern.sub(sub, text)
    return text, counts
