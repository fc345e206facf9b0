"""The incremental multipart reader WADO-RS answers and form uploads go through: the same parts
however the body is cut into chunks, form parts named, and malformed bodies refused."""

from __future__ import annotations

import os
import random

import pytest

from ctloop.multipart import MultipartError, MultipartReader, Part, boundary_of


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
        parts += [p.content for p in reader.feed(body[at : at + n])]
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


def _form(boundary: bytes = b"f0rm") -> bytes:
    return (
        b"--" + boundary + b"\r\n"
        b'Content-Disposition: form-data; name="site_id"\r\n\r\n'
        b"site-a\r\n--" + boundary + b"\r\n"
        b'Content-Disposition: form-data;\r\n name="file"; filename="ct \xc3\xa9.nii.gz"\r\n'
        b"Content-Type: application/gzip\r\n\r\n"
        + bytes(range(256)) * 300
        + b"\r\n--"
        + boundary
        + b"--\r\n"
    )


def test_form_parts_carry_their_field_and_file_names():
    reader = MultipartReader(boundary_of("multipart/form-data; boundary=f0rm", "form-data"))
    body = _form()
    parts = [p for at in range(0, len(body), 999) for p in reader.feed(body[at : at + 999])]
    reader.close()
    assert [p.form_name() for p in parts] == [("site_id", None), ("file", "ct é.nii.gz")]
    assert parts[0].content == b"site-a"
    assert parts[1].content == bytes(range(256)) * 300  # a folded header line read whole
    assert parts[1].headers["content-type"] == "application/gzip"


def test_a_large_part_fed_in_network_sized_chunks_comes_out_whole():
    content = os.urandom(3 << 20)
    body = _body([content, b"tail"])
    for size in (65536, 1 << 20, 4099):
        assert _read(body, size) == [content, b"tail"]


def test_form_parts_without_a_form_data_name_are_refused():
    for disposition in (b"attachment; name=x", b"form-data", None):
        headers = {} if disposition is None else {"content-disposition": disposition.decode()}
        part = Part(headers, b"")
        with pytest.raises(MultipartError):
            part.form_name()


def test_a_form_boundary_must_come_from_a_form_data_content_type():
    assert boundary_of("multipart/form-data; boundary=x", "form-data") == b"x"
    with pytest.raises(MultipartError, match="multipart/form-data"):
        boundary_of("multipart/related; boundary=x", "form-data")
