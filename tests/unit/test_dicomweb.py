"""The DICOMweb client's input grammar (UIDs, base URLs) and that it follows no redirect."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ctloop import dicomweb


@pytest.mark.parametrize(
    "uid",
    ["0", "1.2", "1.2.840.10008.5.1.4.1.1.2", "2.25.0", "1." + "2" * 62, "0.0.0"],
)
def test_dicom_uids_pass(uid):
    assert dicomweb.check_uid(uid) == uid


@pytest.mark.parametrize(
    "uid",
    ["", "01", "1.02", "1..2", "1.2.", ".1", "1." + "2" * 63, "1.2?x=", "../1", "1/2", "\uff11.2"],
)
def test_anything_else_is_not_a_uid(uid):
    with pytest.raises(dicomweb.BadUid):
        dicomweb.check_uid(uid)


@pytest.mark.parametrize(
    ("url", "normal"),
    [
        ("http://pacs/dicom-web", "http://pacs/dicom-web"),
        ("HTTP://PACS:80/dicom-web/", "http://pacs/dicom-web"),
        ("https://pacs:443/", "https://pacs"),
        ("https://pacs:8443/a/rs", "https://pacs:8443/a/rs"),
        ("http://[::1]:8042/dicom-web", "http://[::1]:8042/dicom-web"),
        (" http://10.0.0.5/dw ", "http://10.0.0.5/dw"),
    ],
)
def test_base_urls_have_one_spelling(url, normal):
    assert dicomweb.normal_base_url(url) == normal


@pytest.mark.parametrize(
    "url",
    [
        "ftp://pacs/dw",
        "pacs/dw",
        "http://u:p@pacs/dw",
        "http://pacs/dw?x=1",
        "http://pacs/dw#f",
        "http://pacs/a/../dw",
        "http://pacs/./dw",
        "http://pacs//dw",
        "http://pacs/%64w",
        "http://pa\tcs/dw",
        "http://pacs:0x50/dw",
        "http://pác.example/dw",
        "http:///dw",
    ],
)
def test_urls_without_one_plain_spelling_are_refused(url):
    with pytest.raises(dicomweb.BadBaseUrl):
        dicomweb.normal_base_url(url)


def test_the_old_global_list_means_every_site_and_is_deprecated():
    with pytest.warns(DeprecationWarning):
        assert dicomweb.sources_by_site(["http://P/dw/"]) == {"*": ["http://p/dw"]}
    assert dicomweb.sources_by_site({"a": ["http://p/dw", "HTTP://p:80/dw"]}) == {
        "a": ["http://p/dw"]
    }
    with pytest.raises(ValueError):
        dicomweb.sources_by_site({"../a": ["http://p/dw"]})


@contextmanager
def _http(handler: type[BaseHTTPRequestHandler]) -> Iterator[tuple[str, list[str]]]:
    """A real HTTP server on a free port; yields its URL and the paths it was asked for."""
    asked: list[str] = []

    class Recording(handler):  # type: ignore[valid-type,misc]
        def do_GET(self) -> None:
            asked.append(self.path)
            super().do_GET()

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Recording)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        server.server_close()


class _Answers(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.end_headers()
        self.wfile.write(b"[{}]")


def test_a_redirect_to_another_host_is_not_followed():
    with _http(_Answers) as (elsewhere, elsewhere_asked):

        class Redirects(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(302)
                self.send_header("Location", f"{elsewhere}{self.path}")
                self.end_headers()

        with _http(Redirects) as (pacs, pacs_asked):
            with pytest.raises(dicomweb.DicomWebError, match="redirect"):
                dicomweb.series_instances(f"{pacs}/dw", "1.2", "1.2.3")
            with pytest.raises(dicomweb.DicomWebError, match="redirect"):
                dicomweb.retrieve_series(f"{pacs}/dw", "1.2", "1.2.3", 1 << 20)
    assert pacs_asked == ["/dw/studies/1.2/series/1.2.3/instances", "/dw/studies/1.2/series/1.2.3"]
    assert elsewhere_asked == []


def test_the_client_itself_puts_only_uids_into_urls():
    with _http(_Answers) as (pacs, asked):
        with pytest.raises(dicomweb.BadUid):
            dicomweb.series_instances(f"{pacs}/dw", "1.2/../../x", "1.2")
        assert dicomweb.series_instances(f"{pacs}/dw", "1.2", "1.3") == 1
    assert asked == ["/dw/studies/1.2/series/1.3/instances"]


def _answering(status: int, content_type: str, body: bytes) -> type[BaseHTTPRequestHandler]:
    class Answer(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Answer


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ((200, "application/dicom+json", b"<html>oops</html>"), "not JSON"),
        ((200, "application/dicom+json", b'{"a": 1}'), "not a list"),
        ((200, "application/dicom+json", b"[" + b"{}," * 6_000_000 + b"{}]"), "more than"),
        ((200, "application/dicom+json", b"[]"), "no series"),
        ((204, "application/dicom+json", b""), "no series"),
        ((500, "text/plain", b"boom"), "answered 500"),
    ],
)
def test_a_pacs_answer_that_is_not_a_list_of_instances_is_an_error(answer, problem):
    with (
        _http(_answering(*answer)) as (pacs, _),
        pytest.raises(dicomweb.DicomWebError, match=problem),
    ):
        dicomweb.series_instances(f"{pacs}/dw", "1.2", "1.3")


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ((200, "application/dicom", b"DICM"), "not a multipart"),
        ((200, "multipart/related; boundary=B", b"--B\r\n\r\nabc\r\n"), "closing boundary"),
        ((200, "multipart/related; boundary=B", b"--B\r\n\r\n" + b"x" * 5000), "larger than"),
    ],
)
def test_a_wado_answer_that_is_not_well_formed_multipart_is_an_error(answer, problem):
    with (
        _http(_answering(*answer)) as (pacs, _),
        pytest.raises(dicomweb.DicomWebError, match=problem),
    ):
        dicomweb.retrieve_series(f"{pacs}/dw", "1.2", "1.3", max_bytes=4096)
