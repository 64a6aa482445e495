"""The text encodings sidekey writes and parses in more than one place. Pure: no I/O.

- base64url without padding (RFC 7515 §2), as JWS/JWT segments, JWK members, key-set
  files and config signatures use it: :func:`b64url_encode`, :func:`b64url_decode`.
- ISO-8601 in UTC with a ``Z`` suffix, to the second, millisecond or microsecond:
  :func:`iso_utc`.
- Random ids: :func:`random_hex`, :func:`random_uuid4` (the text of a version 4 UUID
  from ``os.urandom``, about 6x cheaper than ``str(uuid.uuid4())``; ids are minted
  several times per call).

One implementation each, so the strict parse a token or signature depends on cannot
drift from one module to the next.
"""

from __future__ import annotations

import base64
import datetime
import os
import re
from typing import Literal

# The unpadded base64url alphabet, nothing else (no "=", no whitespace, no "+/").
_B64URL = re.compile(r"[A-Za-z0-9_-]*")

TimeSpec = Literal["seconds", "milliseconds", "auto"]


def random_hex(nbytes: int = 16) -> str:
    """``nbytes`` random bytes from the OS CSPRNG, as lowercase hex."""
    return os.urandom(nbytes).hex()


def random_uuid4() -> str:
    """A random (version 4, RFC 9562 variant) UUID in its 8-4-4-4-12 text form."""
    h = os.urandom(16).hex()
    variant = "89ab"[int(h[16], 16) & 3]
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:]}"


def b64url_encode(data: bytes) -> str:
    """base64url of ``data`` without ``=`` padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, *, strict: bool = True) -> bytes:
    """Decode unpadded base64url. Raises ValueError (``binascii.Error`` is one).

    ``strict`` (the default, and what every token, JWT and signature parse uses): only
    the base64url alphabet, no padding, and no length that leaves one stray character
    (``len % 4 == 1``): anything else is refused, not silently skipped as the stdlib's
    decoder would. ``strict=False`` is the stdlib's lenient decode (padding optional,
    characters outside the alphabet dropped); it is kept for key material an operator
    pastes into a config file or that sidekey wrote itself, never for wire input.
    """
    if strict and (len(text) % 4 == 1 or not _B64URL.fullmatch(text)):
        raise ValueError("not unpadded base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def iso_utc(when: float | datetime.datetime, timespec: TimeSpec = "seconds") -> str:
    """``when`` as ISO-8601 UTC with ``Z``, e.g. ``2026-04-07T14:23:11Z``.

    ``when`` is a Unix timestamp or a datetime (a naive one is taken to be UTC; an aware
    one is converted). ``timespec`` as :meth:`datetime.datetime.isoformat`: ``seconds``
    and ``milliseconds`` truncate (never round up into the next second); ``auto``
    shows microseconds only when they are not zero.
    """
    if isinstance(when, datetime.datetime):
        utc = when.replace(tzinfo=datetime.UTC) if when.tzinfo is None else when.astimezone(datetime.UTC)
    else:
        utc = datetime.datetime.fromtimestamp(when, datetime.UTC)
    return utc.replace(tzinfo=None).isoformat(timespec=timespec) + "Z"
