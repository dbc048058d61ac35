"""Personal data in text: emails, phone numbers, payment card numbers, US social security numbers, IP
addresses. Regular expressions with validation where a checksum or parser exists (Luhn for cards,
`ipaddress` for IPs), so order numbers and version strings are not flagged as cards or addresses.

Kinds are data: a new kind is one more row in `PATTERNS`."""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable


def _luhn(s: str) -> bool:
    digits = [int(c) for c in s if c.isdigit()]
    if not 13 <= len(digits) <= 19 or len(set(digits)) == 1:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Pattern:
    regex: re.Pattern
    placeholder: str
    valid: Callable[[str], bool] = lambda s: True


# Order matters: earlier kinds claim their span first (a card number also looks like a phone number).
PATTERNS: dict[str, Pattern] = {
    "email": Pattern(re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
                     "[EMAIL]"),
    "card": Pattern(re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"), "[CARD]", _luhn),
    "ssn": Pattern(re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])"), "[SSN]"),
    "ip": Pattern(re.compile(r"(?<![\w.:])(?:(?:\d{1,3}\.){3}\d{1,3}|(?:[0-9A-Fa-f]{1,4}:){2,7}[0-9A-Fa-f]{1,4}|"
                             r"(?:[0-9A-Fa-f]{1,4}:){1,6}:[0-9A-Fa-f]{0,4})(?![\w.:])"), "[IP]", _ip),
    "phone": Pattern(re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?![\w-])"),
                     "[PHONE]"),
}


def find_pii(text: str) -> list[tuple[str, int, int]]:
    """(kind, start, end) spans, non-overlapping, in text order."""
    taken: list[tuple[int, int]] = []
    hits = []
    for kind, p in PATTERNS.items():
        for m in p.regex.finditer(text):
            s, e = m.span()
            if any(s < te and ts < e for ts, te in taken) or not p.valid(m.group()):
                continue
            taken.append((s, e))
            hits.append((kind, s, e))
    return sorted(hits, key=lambda h: h[1])


def count_pii(text: str) -> Counter:
    return Counter(k for k, _, _ in find_pii(text))


def scrub(text: str) -> tuple[str, Counter]:
    """Replace every hit with its placeholder (`[EMAIL]` …); returns the new text and the hits by kind."""
    hits = find_pii(text)
    if not hits:
        return text, Counter()
    out, last = [], 0
    for kind, s, e in hits:
        out.append(text[last:s])
        out.append(PATTERNS[kind].placeholder)
        last = e
    out.append(text[last:])
    return "".join(out), Counter(k for k, _, _ in hits)
