"""Path segments as Google will read them: dot-segment refusal and canonical form. Pure.

A caller can hide a dot segment behind percent-escapes (``%2e%2e``, ``.%2E``, or twice
encoded, ``%252e%252e``). Matched as written such a path looks like one resource, and any
hop that decodes and normalises it lands on another, so the sidecar decides on what the
segments *mean*:

- Every segment is percent-decoded repeatedly (until nothing changes, at most
  `MAX_DECODE_ROUNDS` times) and refused if it then is empty, ``.`` or ``..``, or
  contains ``/`` or a backslash. Repeatedly, because some hop may decode twice; a
  segment still changing after that many rounds is refused as well.
- What is forwarded is the RFC 3986 §6.2.2 normal form of the segment: escapes of
  unreserved characters (letters, digits, ``-._~``) are decoded, the others keep their
  escape with upper-case hex. That is the same resource to every compliant server, so
  ``gemini-2.5-pr%6F`` is forwarded, matched and priced as ``gemini-2.5-pro``.
- A ``%`` that does not start an escape (``%zz``) is refused.

Names the policy matches (publisher and model) must not keep an escape after that: no
real one has a reserved or non-ASCII character (see `routing.resolve`).
"""

from __future__ import annotations

import re
import string
from urllib.parse import unquote

MAX_DECODE_ROUNDS = 4
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


class SegmentError(ValueError):
    """A path segment the sidecar refuses; the message says why."""


def fully_decoded(segment: str) -> str:
    """`segment` percent-decoded until it no longer changes (bytes as latin-1, one to one)."""
    for _ in range(MAX_DECODE_ROUNDS):
        if "%" not in segment:
            return segment
        decoded = unquote(segment, encoding="latin-1")
        if decoded == segment:
            return segment
        segment = decoded
    if "%" in segment and unquote(segment, encoding="latin-1") != segment:
        raise SegmentError(f"a path segment is percent-encoded more than {MAX_DECODE_ROUNDS} times")
    return segment


def check_segment(segment: str) -> None:
    """Raise SegmentError if `segment`, decoded, is empty, '.', '..' or holds '/' or '\\'."""
    decoded = fully_decoded(segment) if "%" in segment else segment
    if decoded in ("", ".", ".."):
        shown = "an empty segment" if not segment else f"the segment {segment!r}"
        extra = f" (decoded: {decoded!r})" if decoded != segment else ""
        raise SegmentError(f"{shown}{extra} is a dot or empty segment")
    if "/" in decoded or "\\" in decoded:
        raise SegmentError(f"the segment {segment!r} holds an encoded '/' or a backslash")


def _normal_escape(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def canonical_segment(segment: str) -> str:
    """The checked segment in RFC 3986 normal form (escapes of unreserved characters decoded)."""
    check_segment(segment)
    if "%" not in segment:
        return segment
    if _BAD_PERCENT.search(segment):
        raise SegmentError(f"the segment {segment!r} has a '%' that is not a percent-escape (%XX)")
    return _ESCAPE.sub(_normal_escape, segment)
