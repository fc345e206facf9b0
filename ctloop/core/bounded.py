"""Decompression that never produces more than its caller allows (decompression bombs).

Every inflate of an upload goes through here. The caller reads a little (a header), learns from
it how much the file declares, and then reads exactly that: a stream that holds more than its
header accounts for is refused, never inflated in full and then dropped. Errors carry a stable
``code`` that the API answers with.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Callable
from typing import cast

from isal import isal_zlib

_gzip_error = cast(type[Exception], isal_zlib.error)

# Zip members are only ever stored or deflated by the tools that export DICOM series; bzip2 and
# LZMA decompress without an output bound in ``zipfile`` and are refused.
ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
# A central directory entry is 46 bytes plus its name and extra field: 1 KiB each is generous.
ZIP_DIRECTORY_BYTES_PER_MEMBER = 1024


class InflateRefused(ValueError):
    """Why a compressed input was refused: ``code`` for programs, the message for people;
    ``too_large`` when a size limit was passed (HTTP 413), else the input is malformed (422)."""

    def __init__(self, code: str, message: str, too_large: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.too_large = too_large


class GzipReader:
    """A gzip file read front to back, never inflating more than each :meth:`read` asks for.

    One member, or several one after another (bgzip writes them): the data runs on across
    members. :meth:`expect_end` then says whether anything follows what was read."""

    def __init__(self, data: bytes) -> None:
        self._rest: bytes = data  # input not yet handed to a decompressor
        self._inflater: object | None = None
        self.members = 0

    def read(self, n: int) -> bytes:
        """Up to ``n`` more bytes (fewer only where the stream ends); a corrupt or truncated
        stream raises :class:`InflateRefused`."""
        parts: list[bytes] = []
        need = n
        while need > 0:
            chunk = self._inflate(need, at_end=False)
            if chunk is None:
                break
            parts.append(chunk)
            need -= len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def expect_end(self) -> None:
        """Refuse if anything follows: more data in the member or another member with data
        in it (``trailing_data``), bytes that are not gzip (``corrupt_gzip``). Empty members
        (bgzip's end marker) are allowed; at most one byte is inflated to find out."""
        if self._inflate(1, at_end=True):
            raise InflateRefused("trailing_data", "the file holds data after the image it declares")

    def _inflate(self, limit: int, at_end: bool) -> bytes | None:
        """At most ``limit`` bytes from the current member (b"" when it ended without output),
        or None at the end of the input."""
        d = self._inflater
        if d is None:
            if not self._rest:
                return None
            d, src = isal_zlib.decompressobj(16 + isal_zlib.MAX_WBITS), self._rest
            self._inflater, self._rest = d, b""
            self.members += 1
        else:
            src = d.unconsumed_tail  # type: ignore[attr-defined]
        try:
            chunk: bytes = d.decompress(src, limit)  # type: ignore[attr-defined]
        except _gzip_error as exc:
            where = "after its gzip stream" if at_end else "in its gzip stream"
            raise InflateRefused(
                "corrupt_gzip", f"the file holds bytes that are not gzip {where}"
            ) from exc
        if d.eof:  # type: ignore[attr-defined]
            self._inflater, self._rest = None, d.unused_data  # type: ignore[attr-defined]
        elif not chunk and not d.unconsumed_tail:  # type: ignore[attr-defined]
            raise InflateRefused("truncated", "the gzip stream ends early (truncated upload?)")
        return chunk


def read_at_most(read: Callable[[int], bytes], limit: int) -> bytes:
    """Bytes from a stream until it ends or ``limit`` is passed (then ``limit + 1`` bytes, so
    the caller sees that there was more), never asking it for more than that."""
    parts, size = [], 0
    while size <= limit:
        chunk = read(min(limit + 1 - size, 1 << 20))
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


def open_zip(data: bytes, max_members: int) -> tuple[zipfile.ZipFile, list[zipfile.ZipInfo]]:
    """A zip archive and its file members, refused before its central directory is parsed if
    that directory is larger than ``max_members`` entries can need (``zipfile`` keeps an
    object per entry: a million tiny entries would take gigabytes), and refused for members
    it could not read with a bound: other compression methods, encryption."""
    try:
        # The end record says how large the central directory is; zipfile reads it the same way
        # before parsing (a private helper of the standard library, unchanged since Python 2).
        end = zipfile._EndRecData(io.BytesIO(data))  # type: ignore[attr-defined]
    except (OSError, zipfile.BadZipFile, struct.error) as exc:
        raise InflateRefused("not_zip", "not a readable zip archive") from exc
    if not end:
        raise InflateRefused("not_zip", "not a readable zip archive (no end record)")
    entries, size = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]  # type: ignore[attr-defined]
    if entries > max_members or size > (max_members + 1) * ZIP_DIRECTORY_BYTES_PER_MEMBER:
        raise InflateRefused("too_many_files", f"the zip lists more than {max_members} files", True)
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in archive.infolist() if not m.is_dir()]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError) as exc:
        raise InflateRefused("not_zip", "not a readable zip archive") from exc
    if len(members) > max_members:
        raise InflateRefused("too_many_files", f"the zip holds more than {max_members} files", True)
    for m in members:
        if m.flag_bits & 0x1:
            raise InflateRefused("zip_encrypted", f"zip member {m.filename!r} is encrypted")
        if m.compress_type not in ZIP_METHODS:
            raise InflateRefused(
                "zip_method", f"zip member {m.filename!r}: only stored or deflated members"
            )
    return archive, members


def zip_member_reader(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> Callable[[int], bytes]:
    """``read(n)`` of one member, inflated incrementally; a corrupt member (bad CRC, broken
    deflate data, a size that lies) raises ``corrupt_zip``. ``zipfile`` stops at the size
    the directory declares; the callers' budgets bound it from the other side."""
    # zipfile raises NotImplementedError for versions and features it lacks (patched data).
    broken = (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, NotImplementedError)
    try:
        src = archive.open(member)
    except broken as exc:
        raise InflateRefused("corrupt_zip", f"zip member {member.filename!r} is corrupt") from exc

    def read(n: int) -> bytes:
        try:
            return src.read(n)
        except broken as exc:
            raise InflateRefused(
                "corrupt_zip", f"zip member {member.filename!r} is corrupt"
            ) from exc

    return read
