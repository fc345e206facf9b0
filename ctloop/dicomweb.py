"""DICOMweb (QIDO-RS, WADO-RS, STOW-RS) with a PACS such as Orthanc: a series pulled in, a SEG
stored back (:func:`store_instance`, through dicomweb-client).

Nothing a caller sends reaches a URL unchecked: study and series UIDs must match the DICOM UID
grammar (:func:`check_uid`), base URLs are compared in one normal form (:func:`normal_base_url`),
and redirects are never followed (a PACS that redirects is answered with an error, so an
allowed service cannot send ingest to a host nobody allowed).
"""

from __future__ import annotations

import re
import warnings
from typing import Any
from urllib.parse import urlsplit

import httpx
import requests

from ctloop.multipart import MultipartError, MultipartReader, boundary_of

# PS3.5 9.1: components of digits separated by '.', no leading zero in a multi-digit
# component, at most 64 characters in all.
UID_MAX_CHARS = 64
_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
# What a base URL's path may hold: RFC 3986 unreserved characters, '/', and the sub-delimiters
# PACS paths use. No '%' (one spelling per path), no '?' or '#', no dot segments.
_PATH = re.compile(r"[A-Za-z0-9._~/@:;=+,!$'()*-]*")
_HOST = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\]")
_DEFAULT_PORTS = {"http": 80, "https": 443}
# The most a QIDO-RS answer (a JSON list of a series' instances) may be.
QIDO_MAX_BYTES = 16 * 1024 * 1024
# The key of an allow-list entry that serves every site (what the old, global list meant).
ALL_SITES = "*"


class DicomWebError(RuntimeError):
    pass


class BadUid(ValueError):
    """A study or series UID that does not follow the DICOM UID grammar."""


class BadBaseUrl(ValueError):
    """A DICOMweb base URL that cannot be compared exactly (or is not http/https)."""


def check_uid(value: str, what: str = "UID") -> str:
    """``value`` if it is a DICOM UID (PS3.5 9.1), else :class:`BadUid`. Only digits and
    dots pass, so a UID can never add a path segment, a query or a host to a URL."""
    if len(value) > UID_MAX_CHARS:
        raise BadUid(f"{what} is longer than {UID_MAX_CHARS} characters")
    if not _UID.fullmatch(value):
        raise BadUid(f"{what} must be digit components separated by '.', without leading zeros")
    return value


def normal_base_url(url: str) -> str:
    """The one spelling of a DICOMweb base URL that allow-lists store and compare:
    ``scheme://host[:port]/path`` with the scheme and host in lower case, the scheme's default
    port left out and no trailing '/'. Credentials, queries, fragments, percent-escapes, dot
    segments and empty segments are refused (:class:`BadBaseUrl`): each would give one service
    several spellings, or a spelling that names another one."""
    url = url.strip()
    if any(c.isspace() or not c.isprintable() for c in url):
        raise BadBaseUrl("the URL must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BadBaseUrl(f"not a URL: {exc}") from exc
    scheme, host = parts.scheme.lower(), (parts.hostname or "")
    if scheme not in _DEFAULT_PORTS:
        raise BadBaseUrl("the URL must start with http:// or https://")
    if "@" in parts.netloc or parts.query or parts.fragment or "?" in url or "#" in url:
        raise BadBaseUrl("the URL must not carry credentials, a query or a fragment")
    if ":" in host:
        host = f"[{host}]"
    if not _HOST.fullmatch(host):
        raise BadBaseUrl(f"not a host name: {parts.hostname!r}")
    path = parts.path.rstrip("/")
    segments = path.split("/")[1:]
    if not _PATH.fullmatch(path) or any(s in ("", ".", "..") for s in segments):
        raise BadBaseUrl(f"the path {parts.path!r} is not in plain form")
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    return f"{scheme}://{netloc}{path}"


def sources_by_site(value: Any) -> dict[str, list[str]]:
    """A site → base URLs allow-list in normal form (:func:`normal_base_url`); site ids are
    checked like every key segment. A plain list is the deprecated global form and means
    :data:`ALL_SITES`."""
    from ctloop.contracts.keys import safe_id

    if isinstance(value, (list, tuple)):
        warnings.warn(
            "services.dicomweb_sources as a list allows every PACS for every site; give a "
            'mapping of site id to base URLs instead ({"site-a": ["https://pacs/dicom-web"]})',
            DeprecationWarning,
            stacklevel=2,
        )
        value = {ALL_SITES: list(value)} if value else {}
    if not isinstance(value, dict):
        raise ValueError("dicomweb_sources must map site ids to lists of base URLs")
    by_site: dict[str, list[str]] = {}
    for site, urls in value.items():
        site = site if site == ALL_SITES else safe_id(str(site), "site id")
        if isinstance(urls, str) or not isinstance(urls, (list, tuple)):
            raise ValueError(f"dicomweb_sources[{site!r}] must be a list of base URLs")
        by_site[site] = sorted({normal_base_url(str(u)) for u in urls})
    return by_site


def _series_url(base_url: str, study_uid: str, series_uid: str) -> str:
    """The series' resource under ``base_url``; the UIDs are checked here too, so no caller
    can put anything else into the URL."""
    study = check_uid(study_uid, "study_uid")
    series = check_uid(series_uid, "series_uid")
    return f"{normal_base_url(base_url)}/studies/{study}/series/{series}"


def _refuse_redirect(r: httpx.Response, what: str) -> None:
    if r.is_redirect:
        raise DicomWebError(
            f"{what} answered a redirect ({r.status_code}); redirects are not followed"
        )


_TAG = re.compile(r"[0-9A-Fa-f]{8}")


def series_instances(
    base_url: str, study_uid: str, series_uid: str, timeout_s: float = 60.0
) -> int:
    """How many instances the PACS lists for the series (QIDO-RS, through dicomweb-client); an
    answer that is not a JSON list, or larger than :data:`QIDO_MAX_BYTES`, is a
    :class:`DicomWebError`."""
    study = check_uid(study_uid, "study_uid")
    series = check_uid(series_uid, "series_uid")
    pacs = client(base_url, timeout_s, max_bytes=QIDO_MAX_BYTES)
    try:
        found = pacs.search_for_instances(study_instance_uid=study, series_instance_uid=series)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "no answer"
        if status != 404:
            raise DicomWebError(f"QIDO-RS answered {status}") from exc
        found = []
    except ValueError as exc:  # requests' JSONDecodeError is one
        raise DicomWebError("QIDO-RS answered something that is not JSON") from exc
    except requests.RequestException as exc:
        raise DicomWebError(f"the PACS could not be reached: {exc}") from exc
    # dicomweb-client takes a lone object for a list of one: each item must be a DICOM JSON
    # data set (tags as keys).
    if not isinstance(found, list) or not all(
        isinstance(item, dict) and all(_TAG.fullmatch(str(k)) for k in item) for item in found
    ):
        raise DicomWebError("QIDO-RS answered JSON that is not a list of instances")
    if not found:
        raise DicomWebError(f"the PACS has no series {series_uid} in study {study_uid}")
    return len(found)


def retrieve_series(
    base_url: str, study_uid: str, series_uid: str, max_bytes: int, timeout_s: float = 300.0
) -> list[bytes]:
    """Every instance of the series as DICOM Part 10 bytes (WADO-RS), at most ``max_bytes``
    received in all; each instance is cut from the answer as it arrives (the caller's DICOM
    reader bounds what each may decode to)."""
    url = _series_url(base_url, study_uid, series_uid)
    # transfer-syntax=*: the instances as the PACS stores them (ctloop decodes JPEG 2000,
    # JPEG-LS, JPEG Lossless and RLE itself); without it a PACS must transcode to Explicit VR
    # Little Endian, and one without a decoder for the stored syntax (Orthanc on JPEG 2000)
    # answers 500.
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    instances: list[bytes] = []
    received = 0
    with httpx.stream(
        "GET", url, headers={"Accept": accept}, timeout=timeout_s, follow_redirects=False
    ) as r:
        _refuse_redirect(r, "WADO-RS")
        if r.status_code != 200:
            raise DicomWebError(f"WADO-RS answered {r.status_code}")
        try:
            reader = MultipartReader(boundary_of(r.headers.get("content-type", "")))
            for chunk in r.iter_bytes():
                received += len(chunk)
                if received > max_bytes:
                    raise DicomWebError(f"the series is larger than {max_bytes} bytes")
                instances += [p.content for p in reader.feed(chunk) if p.content]
            reader.close()
        except MultipartError as exc:
            raise DicomWebError(f"WADO-RS answer: {exc}") from exc
    return instances


# ---------------------------------------------------------------- through dicomweb-client
class _Session(requests.Session):
    """What dicomweb-client gets as its requests session: a default timeout on every call, no
    redirect followed (an allowed PACS cannot send ctloop's request, or a SEG, elsewhere) and,
    with ``max_bytes``, answers read as they arrive and refused past that size (a PACS cannot
    make ingest hold more)."""

    def __init__(self, timeout_s: float, max_bytes: int | None = None) -> None:
        super().__init__()
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes

    def request(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", self.timeout_s)
        kwargs["allow_redirects"] = False
        if self.max_bytes is not None:
            kwargs["stream"] = True
        response = super().request(*args, **kwargs)
        if response.is_redirect:
            response.close()
            raise DicomWebError(
                f"the PACS answered a redirect ({response.status_code}); redirects are not followed"
            )
        if self.max_bytes is not None:
            body = bytearray()
            for chunk in response.iter_content(1 << 16):
                body += chunk
                if len(body) > self.max_bytes:
                    response.close()
                    raise DicomWebError(f"the PACS answered more than {self.max_bytes} bytes")
            # What response.content and .json() read from now on (requests keeps it there).
            response._content = bytes(body)
        return response


def client(base_url: str, timeout_s: float = 60.0, max_bytes: int | None = None) -> Any:
    """A :class:`dicomweb_client.DICOMwebClient` for one allowed service (normal form); with
    ``max_bytes``, no answer larger than that is read."""
    from dicomweb_client.api import DICOMwebClient

    pacs = DICOMwebClient(url=normal_base_url(base_url), session=_Session(timeout_s, max_bytes))
    # One attempt: its retries would repeat what the session refused (a redirect, an answer
    # too large) up to five times with growing waits; the API's caller sees the error at once.
    pacs.set_http_retry_params(retry=False)
    return pacs


def instance_metadata(
    base_url: str, study_uid: str, series_uid: str, sop_instance_uid: str
) -> dict[str, Any]:
    """One instance's DICOM JSON metadata (WADO-RS); a PACS that does not hold it, or answers
    anything but one object, is a :class:`DicomWebError`."""
    study, series = check_uid(study_uid, "study_uid"), check_uid(series_uid, "series_uid")
    sop = check_uid(sop_instance_uid, "sop_instance_uid")
    try:
        found = client(base_url).retrieve_instance_metadata(study, series, sop)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "no answer"
        raise DicomWebError(f"the PACS does not hold instance {sop} (WADO-RS {status})") from exc
    except requests.RequestException as exc:
        raise DicomWebError(f"the PACS could not be reached: {exc}") from exc
    if not isinstance(found, dict):
        raise DicomWebError("WADO-RS metadata answered something that is not one instance")
    return found


def store_instance(base_url: str, dataset: Any) -> None:
    """One DICOM object stored in the PACS (STOW-RS); any failure the PACS reports, or an
    answer that is not a success, is a :class:`DicomWebError`."""
    try:
        answer = client(base_url, timeout_s=300.0).store_instances([dataset])
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "no answer"
        raise DicomWebError(f"the PACS refused the object (STOW-RS {status})") from exc
    except requests.RequestException as exc:
        raise DicomWebError(f"the PACS could not be reached: {exc}") from exc
    failed = getattr(answer, "FailedSOPSequence", None) if answer is not None else None
    if failed:
        reasons = [str(getattr(item, "FailureReason", "?")) for item in failed]
        raise DicomWebError(f"the PACS did not store the object (failure reasons {reasons})")
