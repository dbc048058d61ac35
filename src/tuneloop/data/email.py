"""The e-mail cleaning step: what a person reading a raw message would read. Keeps the subject and the
body (the text/plain part, else the text/html part as text); drops the routing headers (Received,
Return-Path, Message-Id, X-...), quoted replies (`>` lines, the "On ... wrote:" line before them, and
everything below an "-----Original Message-----" or "Forwarded message" line) and the signature (below
a `-- ` line, RFC 3676). A text without a header block is not an e-mail and is left as it is.

Used by `tuneloop data clean --email` (a logged step) and by a recipe's `data.clean: email`, which the
run stores, so evaluation and `/v1/classify` clean their inputs the same way training did.
"""

from __future__ import annotations

import email
import email.policy
import html
import re
from html.parser import HTMLParser

_HEADER_LINE = re.compile(r"^[A-Za-z][A-Za-z0-9-]*:[ \t]|^From \S+")
_MAIL_HEADER = re.compile(r"^(From|To|Cc|Subject|Date|Received|Return-Path|Message-Id|Reply-To|Delivery-Date|"
                          r"MIME-Version|Content-Type):[ \t]|^From \S+", re.I)
_ATTRIBUTION = re.compile(r"^(On .{0,200}wrote:|.{0,100} (wrote|writes):)\s*$")
_ORIGINAL = re.compile(r"^\s*-{2,}\s*(Original Message|Forwarded message|Begin forwarded message)\b.*$", re.I)
_BLANKS = re.compile(r"\n{3,}")


def header_block(text: str) -> int:
    """Characters of `text` taken by a leading RFC 822 header block (0 when it does not start with one):
    at least two header lines before the first blank line, one of them a mail header (From, Subject,
    Received, ...), so "Review: ...\nScore: ..." is not taken for one."""
    head, sep, _ = text.partition("\n\n")
    lines = [l for l in head.split("\n") if l.strip()]
    headers = sum(1 for l in lines if _HEADER_LINE.match(l))
    continued = sum(1 for l in lines if l[:1] in (" ", "\t"))
    if headers < 2 or headers + continued < len(lines) or not any(_MAIL_HEADER.match(l) for l in lines):
        return 0
    return len(head) + len(sep)


class _Text(HTMLParser):
    """The visible text of an HTML part (no scripts or styles), blocks on their own lines."""

    BLOCKS = {"p", "br", "div", "tr", "li", "h1", "h2", "h3", "h4", "table", "td"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self.skip += 1
        elif tag in self.BLOCKS:
            self.out.append("\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style") and self.skip:
            self.skip -= 1

    def handle_data(self, data):
        if not self.skip:
            self.out.append(data)


def html_text(markup: str) -> str:
    p = _Text()
    try:
        p.feed(markup)
        p.close()
    except Exception:  # broken markup in real mail: fall back to the tag-stripped text
        return html.unescape(re.sub(r"<[^>]+>", " ", markup))
    return re.sub(r"[ \t]+", " ", "".join(p.out))


def _body(msg) -> tuple[str, str]:
    """(text, kind) of the message's readable body: text/plain first, else text/html as text."""
    plain, markup = [], []
    for part in msg.walk() if msg.is_multipart() else [msg]:
        if part.is_multipart() or part.get_content_disposition() == "attachment":
            continue
        kind = part.get_content_type()
        if kind not in ("text/plain", "text/html"):
            continue
        try:
            payload = part.get_content()
        except Exception:  # an unknown charset or a broken transfer encoding: the raw payload
            payload = part.get_payload(decode=False)
        if isinstance(payload, bytes):
            payload = payload.decode("utf-8", "replace")
        (plain if kind == "text/plain" else markup).append(str(payload))
    if plain:
        return "\n".join(plain), "text/plain"
    if markup:
        return "\n".join(html_text(m) for m in markup), "text/html"
    return "", "none"


def email_body(text: str) -> tuple[str, dict]:
    """(cleaned text, what was removed). The cleaned text is "Subject: ...\\n\\n" plus the body without
    quoted replies and signature. The dict: `email` (False: not an e-mail, text unchanged), `header_lines`,
    `quoted_lines`, `signature_lines`, `body` (text/plain, text/html or none), `chars_before`, `chars_after`."""
    cut = header_block(text)
    if not cut:
        return text, {"email": False}
    msg = email.message_from_string(text, policy=email.policy.default)
    header_lines = text[:cut].count("\n")
    body, kind = _body(msg)
    kept: list[str] = []
    quoted = signature = 0
    lines = body.replace("\r\n", "\n").split("\n")
    for i, line in enumerate(lines):
        if line.rstrip() == "--" and line.startswith("--"):
            signature = len(lines) - i
            break
        if _ORIGINAL.match(line):
            quoted += len(lines) - i
            break
        if line.lstrip().startswith(">"):
            quoted += 1
            continue
        if _ATTRIBUTION.match(line.strip()) and any(l.lstrip().startswith(">") for l in lines[i + 1:i + 3]):
            quoted += 1
            continue
        kept.append(line.rstrip())
    subject = str(msg.get("Subject", "") or "").strip()
    cleaned = _BLANKS.sub("\n\n", "\n".join(kept)).strip()
    if subject:
        cleaned = f"Subject: {subject}\n\n{cleaned}"
    return cleaned, {"email": True, "header_lines": header_lines, "quoted_lines": quoted,
                     "signature_lines": signature, "body": kind, "chars_before": len(text),
                     "chars_after": len(cleaned)}


CLEANERS = {"email": email_body}


def clean_text(step: str | None, text: str) -> str:
    """`text` through the named cleaning step (`CLEANERS`), or as it is for None."""
    if step is None:
        return text
    if step not in CLEANERS:
        from ..errors import ConfigError

        raise ConfigError(f"data.clean: unknown step {step!r} (known: {', '.join(CLEANERS)})")
    return CLEANERS[step](text)[0]
