"""Header rules (design §3), pure."""

from vertex_sidecar.headers import client_response_headers, upstream_request_headers

CLIENT = [
    (b"host", b"127.0.0.1:4000"),
    (b"authorization", b"Bearer caller-token"),
    (b"x-goog-api-key", b"AIza-caller-key"),
    (b"connection", b"keep-alive, x-hop"),
    (b"x-hop", b"1"),
    (b"keep-alive", b"timeout=5"),
    (b"transfer-encoding", b"chunked"),
    (b"content-length", b"12"),
    (b"te", b"trailers"),
    (b"expect", b"100-continue"),
    (b"x-goog-request-params", b"model=x"),
    (b"anthropic-beta", b"prompt-caching-2024-07-31"),
    (b"accept-encoding", b"gzip"),
    (b"content-type", b"application/json"),
    (b"user-agent", b"google-genai-sdk/3.6.1"),
]


def names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [n for n, _ in headers]


def test_caller_credentials_never_reach_google() -> None:
    out = upstream_request_headers(CLIENT, bearer_token="ya29.sidecar")
    assert dict(out)[b"authorization"] == b"Bearer ya29.sidecar"
    assert b"x-goog-api-key" not in names(out)
    assert names(out).count(b"authorization") == 1


def test_hop_by_hop_and_connection_listed_headers_dropped() -> None:
    out = names(upstream_request_headers(CLIENT, bearer_token="t"))
    for dropped in (b"host", b"connection", b"x-hop", b"keep-alive", b"transfer-encoding", b"content-length",
                    b"te", b"expect"):
        assert dropped not in out
    for kept in (b"x-goog-request-params", b"anthropic-beta", b"accept-encoding", b"content-type", b"user-agent"):
        assert kept in out


def test_client_mode_forwards_caller_authorization() -> None:
    out = upstream_request_headers(CLIENT, bearer_token=None, forward_caller_credentials=True)
    assert dict(out)[b"authorization"] == b"Bearer caller-token"
    assert dict(out)[b"x-goog-api-key"] == b"AIza-caller-key"


def test_quota_project_replaces_callers() -> None:
    out = upstream_request_headers(CLIENT + [(b"x-goog-user-project", b"theirs")], bearer_token="t",
                                   quota_project="billing-proj")
    assert [v for n, v in out if n == b"x-goog-user-project"] == [b"billing-proj"]


def test_response_headers() -> None:
    upstream = [(b"Content-Type", b"text/event-stream"), (b"Transfer-Encoding", b"chunked"),
                (b"Content-Encoding", b"gzip"), (b"X-Goog-Thing", b"1"), (b"Connection", b"close")]
    out = dict(client_response_headers(upstream))
    assert out[b"x-accel-buffering"] == b"no"
    assert out[b"content-encoding"] == b"gzip"
    assert b"transfer-encoding" not in out and b"connection" not in out
    json_out = dict(client_response_headers([(b"content-type", b"application/json"), (b"content-length", b"5")]))
    assert json_out[b"content-length"] == b"5" and b"x-accel-buffering" not in json_out
