"""Sliding-window rate limits (pure, with a fake clock)."""

from vertex_sidecar.config import Limits
from vertex_sidecar.limits import Limiters, RouteLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_minute_with_retry_after() -> None:
    clock = Clock()
    limiter = RouteLimiter("r", Limits(requests_per_minute=3), clock)
    assert [limiter.admit() for _ in range(3)] == [None, None, None]
    clock.now += 10
    refusal = limiter.admit()
    assert refusal is not None and refusal.retry_after_s == 50 and "3 requests per minute" in refusal.message
    clock.now += 49.5
    assert limiter.admit() is not None
    clock.now += 0.6
    assert limiter.admit() is None  # the first three left the window


def test_window_slides_bucket_by_bucket() -> None:
    clock = Clock()
    limiter = RouteLimiter("r", Limits(requests_per_minute=2), clock)
    assert limiter.admit() is None
    clock.now += 30
    assert limiter.admit() is None
    assert limiter.admit() is not None
    clock.now += 30  # the first request expired, the second has not
    assert limiter.admit() is None
    assert limiter.admit() is not None


def test_tokens_per_minute_counts_usage_after_the_fact() -> None:
    clock = Clock()
    limiter = RouteLimiter("r", Limits(tokens_per_minute=100), clock)
    assert limiter.admit() is None
    limiter.record_tokens(80)
    assert limiter.admit() is None
    limiter.record_tokens(40)  # in-flight requests may overshoot
    refusal = limiter.admit()
    assert refusal is not None and "100 tokens per minute" in refusal.message
    clock.now += 61
    assert limiter.admit() is None


def test_limiters_survive_reload_unless_limits_change() -> None:
    limiters = Limiters(Clock())
    first = limiters.for_route("r", Limits(requests_per_minute=5))
    assert limiters.for_route("r", Limits(requests_per_minute=5)) is first
    assert limiters.for_route("r", Limits(requests_per_minute=6)) is not first


def test_token_refusal_says_when_the_window_is_used_up_without_counting_a_request() -> None:
    clock = Clock()
    limiter = RouteLimiter("r", Limits(requests_per_minute=1, tokens_per_minute=100), clock)
    assert limiter.token_refusal() is None
    limiter.record_tokens(99)
    assert limiter.token_refusal() is None
    limiter.record_tokens(1)
    refusal = limiter.token_refusal()
    assert refusal is not None and refusal.retry_after_s == 60 and "100 tokens per minute" in refusal.message
    assert limiter.admit() is not None  # the tokens, not a request, refuse it
    clock.now += 60
    assert limiter.token_refusal() is None and limiter.admit() is None
    assert RouteLimiter("r", Limits(), clock).token_refusal() is None
