"""uvicorn's httptools protocol, bounded: request-target and header sizes, no trailers.

uvicorn sets no size limit with httptools (its `h11_max_incomplete_event_size` applies to
the slower h11 protocol only), and httptools gathers a header field whole before handing it
over, so a caller could make the sidecar buffer a 64 MiB header. This subclass refuses:

- a request target over MAX_REQUEST_TARGET_BYTES with 414 (checked as the URL arrives);
- header fields over MAX_HEADER_BYTES in total with 431 (checked on each field), and any
  request whose head (or trailer section) is still incomplete after MAX_UNPARSED_BYTES fed
  to the parser — the bound on what httptools may hold unparsed, whatever the field sizes.

Refusals are Google-shaped JSON when no response is under way on the connection; the
connection is then closed. Trailer fields after a chunked body are dropped: uvicorn would
append them to the request's header list (`scope["headers"]`), where a handler reading it
late would take them for headers.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .errors import error_body, error_headers

MAX_REQUEST_TARGET_BYTES = 32 * 1024
MAX_HEADER_BYTES = 64 * 1024
# The request line and header block together, plus framing (CRLFs, ": "), with slack.
MAX_UNPARSED_BYTES = MAX_REQUEST_TARGET_BYTES + 2 * MAX_HEADER_BYTES


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing; the refusal is in `_refusal`."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._unparsed = 0  # bytes fed since the parser last made visible progress
        self._header_bytes = 0
        self._in_trailers = False
        self._refusal: tuple[int, str, str] | None = None

    # -- feeding
    def data_received(self, data: bytes) -> None:
        self._unparsed += len(data)
        super().data_received(data)  # a _Refused from a callback ends in send_400_response
        if self._unparsed > MAX_UNPARSED_BYTES and not self.transport.is_closing():
            what = "trailer section" if self._in_trailers else "request head"
            self._respond_and_close(431, f"the {what} is larger than {MAX_UNPARSED_BYTES // 1024} KiB",
                                    "HEADERS_TOO_LARGE")

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parser error; ours when one of our bounds was the cause."""
        if self._refusal is None:
            super().send_400_response(msg)
            return
        code, message, reason = self._refusal
        self._refusal = None
        self._respond_and_close(code, message, reason)

    # -- parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self._in_trailers = False

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > MAX_REQUEST_TARGET_BYTES:
            self._refusal = (414, f"the request target is longer than {MAX_REQUEST_TARGET_BYTES // 1024} KiB",
                             "URI_TOO_LONG")
            raise _Refused()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            what = "trailer fields" if self._in_trailers else "request headers"
            self._refusal = (431, f"the {what} are larger than {MAX_HEADER_BYTES // 1024} KiB in total",
                             "HEADERS_TOO_LARGE")
            raise _Refused()
        if self._in_trailers:
            self._unparsed = 0
            return  # a trailer field, not a header: dropped
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._unparsed = 0
        self._in_trailers = True  # any field from here on follows the body
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._unparsed = 0
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._unparsed = 0
        self._in_trailers = False
        super().on_message_complete()

    # -- refusing
    def _respond_and_close(self, code: int, message: str, reason: str) -> None:
        """Answer in Google's shape unless a response is, or may be, under way on this
        connection (a pipelined request's, or this request's once its app runs); then close."""
        cycle = self.cycle
        if (cycle is None or cycle.response_complete) and not self._in_trailers:
            body = error_body(code, message, "INVALID_ARGUMENT", reason)
            head = [STATUS_LINE[code]]
            for name, value in error_headers(body, [(b"connection", b"close")]):
                head.append(name + b": " + value + b"\r\n")
            self.transport.write(b"".join(head) + b"\r\n" + body)
        self.transport.close()  # connection_lost tells a running app that the caller is gone
