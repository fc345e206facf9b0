"""The incremental multipart reader WADO-RS answers go through: the same parts however the body
is cut into chunks, and malformed bodies refused."""

from __future__ import annotations

import os
import random

import pytest

from ctloop.multipart import MultipartError, MultipartReader, boundary_of


def _body(parts: list[bytes], boundary: bytes = b"b0und") -> bytes:
    out = [b"a preamble to ignore\r\n"]
    for n, part in enumerate(parts):
        pad = b" \t" if n % 2 else b""
        out.append(b"--" + boundary + pad + b"\r\nContent-Type: application/dicom\r\n")
        out.append(b"Content-Transfer-Encoding: binary\r\n\r\n" + part + b"\r\n")
    out.append(b"--" + boundary + b"--\r\nan epilogue to ignore")
    return b"".join(out)


def _read(body: bytes, sizes: random.Random | int, boundary: bytes = b"b0und") -> list[bytes]:
    reader, parts, at = MultipartReader(boundary), [], 0
    while at < len(body):
        n = sizes if isinstance(sizes, int) else sizes.randint(1, 4096)
        parts += reader.feed(body[at : at + n])
        at += n
    reader.close()
    return parts


def test_parts_come_out_the_same_however_the_body_is_cut():
    # content that holds near-boundaries: '--b0und' not after CRLF, CRLF then '--b0un'
    tricky = b"x--b0und\r\n--b0unX\r\n--b0un"
    parts = [os.urandom(5000), b"", tricky, os.urandom(3)]
    body = _body(parts)
    assert _read(body, len(body)) == parts
    assert _read(body, 1) == parts
    rng = random.Random(7)
    for _ in range(50):
        assert _read(body, rng) == parts


def test_a_body_without_its_closing_boundary_is_refused():
    body = _body([b"abc"]).split(b"--b0und--")[0]
    with pytest.raises(MultipartError, match="closing boundary"):
        _read(body, 64)


@pytest.mark.parametrize(
    "body",
    [
        b"--b0und\r\nContent-Transfer-Encoding: base64\r\n\r\nYWJj\r\n--b0und--",
        b"--b0und junk\r\n\r\nabc\r\n--b0und--",
        b"--b0und\r\nContent-Type: application/dicom\r\nabc\r\n--b0und--",
    ],
)
def test_malformed_parts_are_refused(body):
    with pytest.raises(MultipartError):
        _read(body, 5)


def test_the_boundary_comes_from_a_multipart_content_type():
    ct = 'multipart/related; type="application/dicom"; boundary="a:b c"'
    assert boundary_of(ct) == b"a:b c"
    for bad in (
        "application/dicom",
        "multipart/related",
        "multipart/related; boundary=" + "x" * 71,
    ):
        with pytest.raises(MultipartError):
            boundary_of(bad)
