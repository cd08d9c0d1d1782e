"""Which route serves a request, by project, location and model. Pure.

Routes are tried in order and the first whose globs match wins. Without routes the
sidecar allows everything with the default credential. A request that names no model
(operations, the OpenAI-compatible endpoint whose model is in the body) only matches
routes that allow every model, so no path shape slips past a model allowlist.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from .config import Config, Match, Route
from .errors import SidecarError
from .routing import RoutingError, Service, Target, resolve


@dataclass(frozen=True, slots=True)
class Decision:
    route: Route
    target: Target


def _any(patterns: tuple[str, ...], value: str | None) -> bool:
    if patterns == ("*",) or "*" in patterns:
        return True
    return value is not None and any(fnmatchcase(value, p) for p in patterns)


def matches(match: Match, target: Target) -> bool:
    return (_any(match.projects, target.project)
            and _any(match.locations, target.location or "global")
            and _any(match.models, target.model))


def decide(subpath: str, service: Service, config: Config) -> Decision:
    """Resolve the path and pick the route; raises SidecarError (400 bad path, 403 no route)."""
    if config.allow_all:
        try:
            return Decision(config.default_route, resolve(subpath, service=service, defaults=config.defaults,
                                                      upstreams=config.upstreams))
        except RoutingError as exc:
            raise SidecarError(exc.code, exc.message, reason="INVALID_PATH") from None
    first_error: RoutingError | None = None
    target: Target | None = None
    for route in config.routes:
        try:
            target = resolve(subpath, service=service, defaults=route.defaults.over(config.defaults),
                             upstreams=config.upstreams)
        except RoutingError as exc:
            if not exc.missing_defaults:
                raise SidecarError(exc.code, exc.message, reason="INVALID_PATH") from None
            first_error = first_error or exc
            continue
        if matches(route.match, target):
            return Decision(route, target)
    if target is None and first_error is not None:
        raise SidecarError(first_error.code, first_error.message, reason="INVALID_PATH")
    assert target is not None
    raise SidecarError(403, _denied_message(target, config), reason="NO_MATCHING_ROUTE")


def _denied_message(target: Target, config: Config) -> str:
    asked = (f"project={target.project} location={target.location or 'global'} "
             f"model={target.model or '(none in path)'}")
    rules = "; ".join(
        f"{r.name}: projects={list(r.match.projects)} locations={list(r.match.locations)} "
        f"models={list(r.match.models)}" for r in config.routes
    )
    return (f"no route of this sidecar allows {asked}. Routes tried in order: {rules}. "
            "Ask your platform team to extend the VertexRoute, or call an allowed project/location/model.")
