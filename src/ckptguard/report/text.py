"""Text from the run directory made showable: a page and a chart take any name a filesystem or a log holds.

A directory name that is not UTF-8 reaches Python as lone surrogates (``surrogateescape``), and a
logged JSON string may hold one (``"\\udcff"``); neither can be encoded as UTF-8 nor laid out by
matplotlib's fonts. `shown` writes each as an escape: the byte a name held as ``\\xff``, any other
lone surrogate as ``\\ud800``.
"""

from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match[0])
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def shown(text: str) -> str:
    """`text` with each undecodable byte or lone surrogate written as a backslash escape; other text unchanged."""
    return _SURROGATE.sub(_escape, text)
