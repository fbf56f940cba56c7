"""Reading the images of one ``POST /v1/score`` request within the server's limits.

The body is parsed as it streams in (python-multipart's push parser on Starlette's ``request.stream()``), never read
whole first: a ``Content-Length`` over the upload limit is refused before any of the body is read, and a body that
says nothing (chunked) or lies is counted as it arrives and refused the moment it passes the limit; so are the
``max_images + 1``-th file part and a part header over the pixel limit (checked on the image's header, before
decoding). A refused request's rest is read and thrown away up to ``DRAIN_BYTES`` before the answer goes out, so the
client, still sending, gets the 413 rather than a reset connection; nothing of it is kept.

Each upload's file name is only a label for the answer: cut to its last path component, printable characters only,
at most ``MAX_LABEL`` characters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FIELD = "files"  # the repeatable multipart field of the images
MAX_LABEL = 100
DRAIN_BYTES = 16 * 2**20  # read-and-discard allowance after a refusal (a client still sending then sees the answer)


class UploadError(Exception):
    """A request refused for what it sent: an HTTP status and a one-line reason."""

    def __init__(self, status: int, message: str):
        super().__init__(" ".join(str(message).split()))
        self.status = status


@dataclass
class Limits:
    """The server's limits on one request."""

    max_upload_bytes: int = 32 * 2**20
    max_images: int = 32
    max_pixels: int = 40_000_000

    def describe(self) -> dict:
        return {"max_upload_mb": self.max_upload_bytes / 2**20, "max_upload_bytes": self.max_upload_bytes,
                "max_images": self.max_images, "max_pixels": self.max_pixels}


@dataclass
class Upload:
    filename: str  # the label (see label())
    given: str | None = None  # the name as sent (None: the part had no filename)
    data: bytearray = field(default_factory=bytearray, repr=False)


def label(name: str | None, index: int) -> str:
    """A short printable label for an uploaded file's name (never used as a path)."""
    text = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    text = "".join(c if c.isprintable() else "?" for c in text).strip()
    if len(text) > MAX_LABEL:
        text = text[:MAX_LABEL - 1] + "\u2026"
    return text or f"<file {index + 1}>"


def _mb(n: int) -> str:
    return f"{n / 2**20:.3g} MB"


class _Parts:
    """python-multipart callbacks collecting the ``files`` parts (other fields are read and dropped)."""

    def __init__(self, limits: Limits):
        self.limits, self.files, self.ended = limits, [], False
        self._name, self._value, self._headers = b"", b"", {}
        self._current: Upload | None = None
        self._n_parts = 0

    def on_part_begin(self):
        self._headers, self._current = {}, None

    def on_header_field(self, data, start, end):
        self._name += data[start:end]

    def on_header_value(self, data, start, end):
        self._value += data[start:end]

    def on_header_end(self):
        self._headers[self._name.strip().lower()] = self._value.strip()
        self._name, self._value = b"", b""

    def on_headers_finished(self):
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._headers.get(b"content-disposition", b"").decode("latin-1"))
        if "name" not in {k.decode("latin-1") for k in options}:
            raise UploadError(400, 'a multipart part has no name (Content-Disposition: form-data; name="files")')
        if options[b"name"].decode("utf-8", "replace") != FIELD:
            return
        if len(self.files) >= self.limits.max_images:
            raise UploadError(413, f"more than {self.limits.max_images} images in one request (--max-images); "
                                   f"send them in several requests")
        raw = options.get(b"filename")
        name = raw.decode("utf-8", "replace") if raw is not None else None  # browsers and curl send UTF-8 names
        self._current = Upload(label(name, self._n_parts), name)
        self._n_parts += 1

    def on_part_data(self, data, start, end):
        if self._current is not None:
            self._current.data += data[start:end]

    def on_part_end(self):
        up = self._current
        # a form's file input with nothing chosen sends one part with an empty name and no bytes: not a file
        if up is not None and not (up.data == b"" and not up.given):
            self.files.append(up)
        self._current = None

    def on_end(self):
        self.ended = True


async def read_files(request, limits: Limits) -> list[Upload]:
    """The uploads of ``request`` (a Starlette ``Request``) in the order sent; :class:`UploadError` for what cannot
    be accepted (see the module docstring), after the rest of the body is drained."""
    from starlette.requests import ClientDisconnect

    stream = request.stream()
    try:
        return await _read(request.headers, stream, limits)
    except UploadError:
        if drain_wanted(request.headers):
            await _drain(stream)
        raise
    except ClientDisconnect:
        raise UploadError(400, "the client went away before the upload finished") from None


async def _read(headers, stream, limits: Limits) -> list[Upload]:
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    length = headers.get("content-length")
    # no body at all (HTTP: no Content-Length and no Transfer-Encoding means none) is an empty request, whatever
    # the content type says
    if (length is not None and length.strip() == "0") or (length is None and "transfer-encoding" not in headers):
        raise UploadError(400, f"empty request: send one or more images in the multipart field {FIELD!r}")
    ctype, options = parse_options_header(headers.get("content-type", ""))
    if ctype != b"multipart/form-data":
        shown = ctype.decode("latin-1") or "none"
        raise UploadError(415, f"send the images as multipart/form-data (field {FIELD!r}), not {shown}")
    boundary = options.get(b"boundary")
    if not boundary:
        raise UploadError(400, "the multipart/form-data content type has no boundary")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise UploadError(400, f"bad Content-Length {length!r}") from None
        if declared > limits.max_upload_bytes:
            raise UploadError(413, f"the upload is {_mb(declared)}, over the limit of {_mb(limits.max_upload_bytes)} "
                                   f"(--max-upload-mb); send fewer or smaller images per request")
    parts = _Parts(limits)
    parser = MultipartParser(boundary, {k: getattr(parts, k) for k in (
        "on_part_begin", "on_part_data", "on_part_end", "on_header_field", "on_header_value", "on_header_end",
        "on_headers_finished", "on_end")})
    seen = 0
    try:
        async for chunk in stream:
            seen += len(chunk)
            if seen > limits.max_upload_bytes:
                raise UploadError(413, f"the upload is over the limit of {_mb(limits.max_upload_bytes)} "
                                       f"(--max-upload-mb); send fewer or smaller images per request")
            if chunk:
                parser.write(chunk)
        parser.finalize()
    except FormParserError:
        raise UploadError(400, "malformed multipart/form-data body") from None
    if seen == 0:
        raise UploadError(400, f"empty request: send one or more images in the multipart field {FIELD!r}")
    if not parts.ended:
        raise UploadError(400, "the multipart/form-data body ends before its closing boundary (cut off?)")
    if not parts.files:
        raise UploadError(400, f"no images: send them in the multipart field {FIELD!r} (repeat it for several)")
    return parts.files


def drain_wanted(headers) -> bool:
    """Whether to read a refused request's rest before answering: not when the client waits for "100 Continue" (it
    has sent nothing yet, and sends nothing once answered), nor when it says the rest is over ``DRAIN_BYTES``."""
    if headers.get("expect", "").lower() == "100-continue":
        return False
    try:
        return int(headers.get("content-length", "0")) <= DRAIN_BYTES
    except ValueError:
        return False


async def _drain(stream) -> None:
    """Read and drop the rest of a refused body, up to ``DRAIN_BYTES`` (then the connection is closed on it)."""
    from starlette.requests import ClientDisconnect

    left = DRAIN_BYTES
    try:
        async for chunk in stream:
            left -= len(chunk)
            if left < 0:
                return
    except (ClientDisconnect, RuntimeError):  # gone, or the stream was already read to its end
        return


def check_pixels(data: bytes, name: str, max_pixels: int) -> None:
    """413 for an image whose header says it has more than ``max_pixels`` pixels (read before decoding)."""
    import io
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the decompression-bomb warning: the limit here decides
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
    except Image.DecompressionBombError:  # Pillow's own refusal at open (over twice its pixel limit)
        raise UploadError(413, f"{name} has more than {max_pixels:,} pixels (--max-pixels); send a smaller "
                               f"image") from None
    except Exception:  # not an image header: decode_image says what is wrong with it
        return
    if w * h > max_pixels:
        raise UploadError(413, f"{name} is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
                               f"(--max-pixels); send a smaller image")


__all__ = ["DRAIN_BYTES", "FIELD", "Limits", "Upload", "UploadError", "check_pixels", "drain_wanted", "label",
           "read_files"]
