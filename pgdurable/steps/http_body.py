"""HTTP response bodies: read capped as they stream (:func:`read_capped`: bytes received and
bytes after undoing at most one gzip/deflate layer, bounded), and rendered for the result
envelope (:func:`render_body`: text for textual media types, else base64). The response side
of :mod:`pgdurable.steps.http_step`; no policy (that is :mod:`pgdurable.steps.http_policy`).
"""

from __future__ import annotations

import base64
import codecs
import zlib
from typing import Final, Literal

import httpx

from pgdurable.errors import HttpStepError

_TEXTUAL_SUBTYPES: Final = frozenset(
    {
        "json",
        "xml",
        "javascript",
        "x-javascript",
        "ecmascript",
        "x-ecmascript",
        "x-www-form-urlencoded",
        "graphql",
        "yaml",
        "x-yaml",
    }
)

# Content codings decoded (one layer at most) and what we advertise: exactly these, whatever
# optional decoders (brotli, zstandard) httpx would otherwise pick up from the environment.
_DECODED_CODINGS: Final = {"gzip": "gzip", "x-gzip": "gzip", "deflate": "deflate"}
ACCEPT_ENCODING: Final = "gzip, deflate"
# Largest piece one zlib call may produce: bounds the decoder's own buffers, whatever the cap.
_INFLATE_STEP: Final = 256 * 1024


def media_type(content_type: str | None) -> tuple[str, str | None]:
    """(lower-case media type, charset or None) of a Content-Type header."""
    if not content_type:
        return "", None
    media, *params = content_type.split(";")
    charset = None
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            charset = value.strip().strip('"') or None
    return media.strip().lower(), charset


def is_textual(media_type: str) -> bool:
    """Whether a response of this media type is returned as text (docs/http.md)."""
    if media_type.startswith("text/") or media_type.endswith(("+json", "+xml", "+yaml")):
        return True
    return media_type.partition("/")[2] in _TEXTUAL_SUBTYPES


def codec(charset: str | None) -> str:
    """The Python codec of a charset (UTF-8 when unknown or none)."""
    if charset:
        try:
            return codecs.lookup(charset).name
        except LookupError:
            pass
    return "utf-8"


def render_body(body: bytes, content_type: str | None) -> tuple[str, Literal["text", "base64"]]:
    """(body, encoding): text for textual media types or NUL-free UTF-8 bytes, else base64.

    Textual bodies are decoded with their charset (UTF-8 by default), undecodable bytes
    replaced. Text containing NUL is base64 too: jsonb cannot store ``\\u0000``.
    """
    media, charset = media_type(content_type)
    if is_textual(media):
        text = body.decode(codec(charset), "replace")
        if "\0" not in text:
            return text, "text"
    elif b"\0" not in body:
        try:
            return body.decode("utf-8"), "text"
        except UnicodeDecodeError:
            pass
    return base64.b64encode(body).decode("ascii"), "base64"


def _content_coding(response: httpx.Response, cap: int, shown: str) -> str | None:
    """The one coding to undo (``"gzip"`` / ``"deflate"``), or None for an unencoded body.

    HttpStepError for more than one layer (``gzip, gzip``: each layer multiplies what a few
    bytes inflate to) and for codings we do not decode (httpx would pass ``br`` through raw).
    ``identity`` and empty entries are ignored.
    """
    values = response.headers.get_list("content-encoding", split_commas=True)
    codings = [c for c in (v.strip().lower() for v in values) if c and c != "identity"]
    if len(codings) > 1:
        raise HttpStepError(
            f"response from {shown!r} has {len(codings)} Content-Encoding layers "
            f"({', '.join(codings)!r}): HTTP steps decode at most one layer, up to the "
            f"{cap}-byte response cap (max_response_bytes)"
        )
    if not codings:
        return None
    coding = _DECODED_CODINGS.get(codings[0])
    if coding is None:
        raise HttpStepError(
            f"response from {shown!r} has Content-Encoding {codings[0]!r}, which HTTP steps do "
            f"not decode (they accept {ACCEPT_ENCODING})"
        )
    return coding


class _Inflater:
    """Undo one gzip or deflate layer incrementally, never producing more than asked for.

    ``zlib``'s ``max_length`` bounds each call's output; what was not consumed stays in
    ``unconsumed_tail`` and is fed again only while the caller's room lasts. Data after the
    end of the (first) compressed stream is ignored, as httpx does.
    """

    def __init__(self, coding: str) -> None:
        self.coding = coding
        # gzip: a gzip header; deflate: a zlib header, or (as some servers send) raw deflate
        self._zlib = zlib.decompressobj(zlib.MAX_WBITS | 16 if coding == "gzip" else zlib.MAX_WBITS)
        self._may_fall_back = coding == "deflate"

    def decode(self, data: bytes, room: int) -> list[bytes]:
        """The decoded pieces of ``data``: at most ``room + 1`` bytes in all (more than ``room``
        means the body is over the cap; the caller stops). Raises ``zlib.error``."""
        out: list[bytes] = []
        produced = 0
        while not self._zlib.eof and produced <= room:
            limit = min(room - produced + 1, _INFLATE_STEP)
            try:
                piece = self._zlib.decompress(data, limit)
            except zlib.error:
                if not self._may_fall_back:
                    raise
                self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
                self._may_fall_back = False
                continue
            self._may_fall_back = False
            out.append(piece)
            produced += len(piece)
            data = self._zlib.unconsumed_tail
            # a full piece may leave output pending inside zlib even with no input left
            if not data and len(piece) < limit:
                break
        return out


async def read_capped(response: httpx.Response, cap: int, shown: str) -> bytes:
    """The response body, decoded, or HttpStepError once ``cap`` bytes are passed.

    The cap applies twice as the body streams: to the bytes received (the declared
    Content-Length is checked first) and to the bytes after decoding, which are produced in
    bounded steps, so neither a long body nor a small compressed one holds more than about
    ``cap`` bytes in memory.
    """
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise HttpStepError(
            f"response from {shown!r} declares {declared} bytes, over the {cap}-byte response "
            "cap (max_response_bytes)"
        )
    coding = _content_coding(response, cap, shown)
    inflater = _Inflater(coding) if coding else None
    chunks: list[bytes] = []
    received = 0
    size = 0
    async for raw in response.aiter_raw():
        received += len(raw)
        if received > cap:
            raise HttpStepError(
                f"response from {shown!r} exceeds the {cap}-byte response cap "
                "(max_response_bytes); reading stopped"
            )
        if inflater is None:
            pieces = [raw]
        else:
            try:
                pieces = inflater.decode(raw, cap - size)
            except zlib.error as exc:
                raise HttpStepError(
                    f"response from {shown!r} has a corrupt {inflater.coding} body: {exc}"
                ) from None
        size += sum(len(piece) for piece in pieces)
        if size > cap:
            raise HttpStepError(
                f"response from {shown!r} decodes ({coding}) to more than the {cap}-byte "
                "response cap (max_response_bytes); decoding stopped"
            )
        chunks.extend(pieces)
    return b"".join(chunks)
