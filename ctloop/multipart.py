"""An incremental reader of a ``multipart/*`` body (RFC 2046): WADO-RS answers and the API's
``multipart/form-data`` uploads (RFC 7578).

The standard library's ``email`` parser holds the body several times over and decodes it as
text: a 100 MB series took 36 s and 840 MB of memory. Starlette's form parser spools every file
part over 1 MB to a temporary file and reads it back: a 92 MB CT and its label took ~0.25 s
more than their bytes took to arrive. This reader is fed the body as it arrives and hands out
each part as soon as its closing boundary is seen. It keeps the chunks of the unfinished part
as they came and joins them once, when the part ends (growing one buffer by every chunk
copied a 90 MB part ~8 times over); a chunk is searched for a boundary only together with the
few bytes before it that a boundary cut in two could start in.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message

# Content-Transfer-Encodings whose content is the bytes themselves (DICOMweb sends binary).
_IDENTITY = {b"", b"binary", b"8bit", b"7bit"}
_MAX_HEADERS = 8192  # bytes of a part's headers
_MAX_PADDING = 1024  # bytes of spaces after a boundary, before its line ends


class MultipartError(ValueError):
    """A body that is not well-formed multipart, or uses an encoding this reader refuses."""


@dataclass(frozen=True)
class Part:
    """One part: its headers (names in lower case) and its content."""

    headers: dict[str, str]
    content: bytes

    def form_name(self) -> tuple[str, str | None]:
        """A ``multipart/form-data`` part's field name and file name (None: a plain field),
        from its ``Content-Disposition`` (RFC 7578 section 4.2)."""
        value = self.headers.get("content-disposition")
        if value is None:
            raise MultipartError("a form part without a Content-Disposition header")
        header = Message()
        header["content-disposition"] = value
        name = header.get_param("name", header="content-disposition")
        if header.get_content_disposition() != "form-data" or not isinstance(name, str):
            raise MultipartError(f"a form part must be form-data with a name, not {value!r}")
        return name, header.get_filename()


def boundary_of(content_type: str, subtype: str | None = None) -> bytes:
    """The boundary parameter of a ``multipart/*`` Content-Type header (``subtype``: that one
    only, e.g. ``form-data``)."""
    header = Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    wanted = "multipart" if subtype is None else f"multipart/{subtype}"
    kind = header.get_content_maintype() if subtype is None else header.get_content_type()
    if kind != wanted or not isinstance(boundary, str):
        raise MultipartError(f"not a {wanted} body: {content_type!r}")
    if not 1 <= len(boundary) <= 70:
        raise MultipartError("a multipart boundary has 1 to 70 characters")
    return boundary.encode("ascii", "strict")


class MultipartReader:
    """Feed the body with :meth:`feed` (which returns the parts it completed), then call
    :meth:`close` (which checks the closing boundary came)."""

    def __init__(self, boundary: bytes) -> None:
        self._delimiter = b"\r\n--" + boundary
        # "preamble", then per part: "line" (the rest of a boundary's line), "headers",
        # "content"; "done" after the closing boundary (the epilogue is ignored).
        self._state = "preamble"
        # Preamble and content: their last len(delimiter) - 1 bytes, where a delimiter cut
        # between two chunks may begin. A CRLF is put in front of the body, so the first
        # boundary looks like every other.
        self._tail = b"\r\n"
        self._pieces: list[bytes | memoryview] = []  # the content so far, as it came
        self._small = b""  # a boundary's line or a header block read so far (bounded)
        self._headers: dict[str, str] = {}

    def feed(self, chunk: bytes) -> list[Part]:
        data = bytes(chunk)
        parts: list[Part] = []
        at = 0
        while at < len(data) and self._state != "done":
            if self._state in ("preamble", "content"):
                at = self._search(data, at, parts)
            elif self._state == "line":
                at = self._line(data, at)
            else:
                at = self._header_block(data, at)
        return parts

    def close(self) -> None:
        if self._state != "done":
            raise MultipartError("the multipart body ended before its closing boundary")

    def _search(self, data: bytes, at: int, parts: list[Part]) -> int:
        """Content (or preamble) up to the next delimiter; where reading goes on in ``data``."""
        size = len(self._delimiter)
        # A delimiter that begins in the tail ends within the chunk's first size - 1 bytes.
        j = (self._tail + data[at : at + size - 1]).find(self._delimiter)
        if j >= 0:
            after = at + j + size - len(self._tail)
            self._trim(len(self._tail) - j)
            self._end_part(parts)
            return after
        i = data.find(self._delimiter, at)
        if i >= 0:
            self._add(memoryview(data)[at:i])
            self._end_part(parts)
            return i + size
        self._add(memoryview(data)[at:] if at else data)
        self._tail = (self._tail + data[max(at, len(data) - size + 1) :])[-(size - 1) :]
        return len(data)

    def _add(self, piece: bytes | memoryview) -> None:
        if self._state == "content" and len(piece):
            self._pieces.append(piece)

    def _trim(self, n: int) -> None:
        """Drop the content's last ``n`` bytes (the start of a delimiter)."""
        while n > 0 and self._pieces:
            last = self._pieces.pop()
            if len(last) > n:
                self._pieces.append(memoryview(last)[: len(last) - n])
            n -= len(last)

    def _end_part(self, parts: list[Part]) -> None:
        if self._state == "content":
            parts.append(Part(self._headers, b"".join(self._pieces)))  # the one copy
        self._pieces, self._tail, self._headers = [], b"", {}
        self._state = "line"

    def _line(self, data: bytes, at: int) -> int:
        """Past a boundary: ``--`` ends the body; else skip padding to the line's end."""
        piece = data[at : at + _MAX_PADDING + 2 - len(self._small)]
        line = self._small = self._small + piece
        if line[:2] == b"--":
            self._state, self._small = "done", b""
            return len(data)
        eol = line.find(b"\r\n")
        if eol < 0:
            if len(line) > _MAX_PADDING or line.strip(b" \t") not in (b"", b"\r", b"-"):
                raise MultipartError("text after a multipart boundary")
            return at + len(piece)
        if line[:eol].strip(b" \t"):
            raise MultipartError("text after a multipart boundary")
        self._state, self._small = "headers", b""
        return at + eol + 2 - (len(line) - len(piece))

    def _header_block(self, data: bytes, at: int) -> int:
        """A part's headers, up to the blank line after them (none: the part starts with it)."""
        piece = data[at : at + _MAX_HEADERS + 4 - len(self._small)]
        block = self._small = self._small + piece
        if block[:2] == b"\r\n":
            end, headers = 0, {}
        else:
            end = block.find(b"\r\n\r\n")
            if end < 0 or self._delimiter in block[: end + 2]:
                if end >= 0 or self._delimiter in block or len(block) > _MAX_HEADERS:
                    raise MultipartError(
                        "a multipart part without the blank line after its headers"
                    )
                return at + len(piece)
            headers = _headers(block[:end])
            end += 2
        self._state, self._small, self._headers = "content", b"", headers
        self._tail, self._pieces = b"", []
        return at + end + 2 - (len(block) - len(piece))


def _headers(block: bytes) -> dict[str, str]:
    """A part's header lines (names in lower case); refused if a transfer encoding changes its
    content's bytes."""
    headers: dict[str, str] = {}
    name = ""
    for line in block.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and name:  # a folded line goes on the header before it
            headers[name] += " " + line.strip().decode("utf-8", "replace")
            continue
        key, colon, value = line.partition(b":")
        if not colon:
            raise MultipartError(f"a multipart part's header line without a colon: {line!r}")
        name = key.strip().lower().decode("latin-1")
        headers[name] = value.strip().decode("utf-8", "replace")
    encoding = headers.get("content-transfer-encoding", "").lower().encode()
    if encoding not in _IDENTITY:
        raise MultipartError(f"transfer encoding {encoding!r} is not accepted")
    return headers
