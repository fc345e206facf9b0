"""Multipart form uploads read as they arrive (:mod:`ctloop.multipart`), not through
Starlette's form parser.

Starlette spools every file part over 1 MB to a temporary file and reads it back; FastAPI then
hands the route an ``UploadFile`` to read once more. Here each part is joined once, when its
closing boundary arrives (with a 92 MB CT and its label, bench 5, realistic preset, the time
outside the service's own laps fell from ~0.36 s to ~0.25 s, and the upload went from 0.72x to
1.05x the same checks in a script). A route describes its form once (:class:`Form`): its text
fields are checked with a pydantic model, a missing or wrong field answering 422
``invalid_request`` in the same shape as FastAPI's own validation (``body.<field>:
<problem>``), and :meth:`Form.openapi` documents the body as FastAPI would from
``File``/``Form`` parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from ctloop.multipart import MultipartError, MultipartReader, Part, boundary_of
from services.ingest.deps import too_large
from services.ingest.errors import ApiError
from services.ingest.validation import Limits

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class FormFile:
    what: str  # as error messages name it ("volume")
    description: str  # for the API's documentation
    required: bool = True


@dataclass(frozen=True)
class Form(Generic[M]):
    """A route's ``multipart/form-data`` body: its text fields and its files by part name."""

    fields: type[M]
    files: dict[str, FormFile]

    def openapi(self) -> dict[str, Any]:
        """The route's ``openapi_extra``: the text fields' schema and the files as binary."""
        schema = self.fields.model_json_schema()
        properties = {
            **schema.get("properties", {}),
            **{
                name: {"type": "string", "format": "binary", "description": f.description}
                for name, f in self.files.items()
            },
        }
        required = [n for n, f in self.files.items() if f.required]
        body = {
            "type": "object",
            "properties": properties,
            "required": [*schema.get("required", []), *required],
        }
        return {
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": body}}}
        }

    async def read(self, request: Request, limits: Limits) -> tuple[M, dict[str, bytes]]:
        """The request's form: its text fields checked, and its files, each refused (413)
        over the size limit and (422) empty. Parts of other names are ignored."""
        content_type = request.headers.get("content-type", "")
        try:
            reader = MultipartReader(boundary_of(content_type, "form-data"))
        except MultipartError as exc:
            raise ApiError(
                "unsupported_media_type", f"send the form as {exc.args[0]}", 415
            ) from exc
        texts: dict[str, str] = {}
        blobs: dict[str, bytes] = {}
        try:
            async for chunk in request.stream():
                for part in reader.feed(chunk):
                    self._take(part, limits, texts, blobs)
            reader.close()
        except MultipartError as exc:
            raise ApiError("invalid_request", f"the multipart form is malformed: {exc}") from exc
        missing = [n for n, f in self.files.items() if f.required and n not in blobs]
        errors = [_problem(name, "Field required", "missing") for name in missing]
        try:
            values = self.fields.model_validate(texts)
        except ValidationError as exc:
            errors += [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        if errors:
            raise RequestValidationError(errors)
        return values, blobs

    def _take(
        self, part: Part, limits: Limits, texts: dict[str, str], blobs: dict[str, bytes]
    ) -> None:
        """One part into ``texts`` or ``blobs`` (or nowhere: a name the form does not have)."""
        name, _ = part.form_name()
        if name in texts or name in blobs:
            raise ApiError("invalid_request", f"the form has {name!r} twice")
        if name in self.files:
            blobs[name] = _file(part.content, limits, self.files[name].what)
        elif name in self.fields.model_fields:
            texts[name] = _text(part.content, name)


def _file(content: bytes, limits: Limits, what: str) -> bytes:
    if len(content) > limits.max_bytes:
        raise too_large(limits, what)
    if not content:
        raise ApiError("empty", f"the {what} is empty")
    return content


def _text(content: bytes, name: str) -> str:
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestValidationError([_problem(name, "not UTF-8 text", "string_unicode")]) from exc


def _problem(name: str, msg: str, kind: str) -> dict[str, Any]:
    return {"loc": ("body", name), "msg": msg, "type": kind, "input": None}
