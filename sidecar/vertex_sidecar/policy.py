"""Which route serves a request, by project, location and model. Pure.

Routes are tried in order and the first whose globs match wins; a route's model aliases
are resolved before its model globs are checked. Without routes the sidecar allows
everything with the default credential. A request that names no model (operations,
listings) only matches routes that allow every model, so no path shape slips past a
model allowlist; the OpenAI-compatible endpoint names its model in the body, which the
proxy reads and passes in as `body_model`.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from .config import Config, Match, Route
from .errors import SidecarError
from .routing import RoutingError, Service, Target, resolve, with_model

OPENAI_COMPAT_METHODS = ("chat/completions", "completions", "embeddings")


@dataclass(frozen=True, slots=True)
class Decision:
    route: Route
    target: Target
    body_model: str | None = None  # the model to write into an OpenAI-compatible body (alias resolved)


def needs_body_model(target: Target) -> bool:
    """The OpenAI-compatible endpoint carries its model in the JSON body, not the path."""
    return target.model is None and target.method in OPENAI_COMPAT_METHODS and "/endpoints/openapi/" in target.path


def split_openai_model(value: str) -> tuple[str | None, str]:
    """"google/gemini-2.0-flash" → ("google", "gemini-2.0-flash")."""
    publisher, slash, model = value.partition("/")
    return (publisher, model) if slash else (None, value)


def _any(patterns: tuple[str, ...], value: str | None) -> bool:
    if "*" in patterns:
        return True
    return value is not None and any(fnmatchcase(value, p) for p in patterns)


def matches(match: Match, target: Target) -> bool:
    return (_any(match.projects, target.project)
            and _any(match.locations, target.location or "global")
            and _any(match.models, target.model))


def resolve_target(subpath: str, service: Service, config: Config) -> Target:
    """Resolve with the top-level defaults (used to learn whether the body must be read)."""
    try:
        return resolve(subpath, service=service, defaults=config.defaults, upstreams=config.upstreams)
    except RoutingError as exc:
        if exc.missing_defaults and not config.allow_all:
            # Some route's own defaults may still complete it; decide() will tell.
            raise
        raise SidecarError(exc.code, exc.message, reason="INVALID_PATH") from None


def decide(subpath: str, service: Service, config: Config, body_model: str | None = None) -> Decision:
    """Resolve the path and pick the route; raises SidecarError (400 bad path, 403 no route)."""
    if config.allow_all:
        try:
            target = resolve(subpath, service=service, defaults=config.defaults, upstreams=config.upstreams)
        except RoutingError as exc:
            raise SidecarError(exc.code, exc.message, reason="INVALID_PATH") from None
        return _with_body_model(config.default_route, target, body_model)
    first_error: RoutingError | None = None
    last_target: Target | None = None
    for route in config.routes:
        try:
            target = resolve(subpath, service=service, defaults=route.defaults.over(config.defaults),
                             upstreams=config.upstreams)
        except RoutingError as exc:
            if not exc.missing_defaults:
                raise SidecarError(exc.code, exc.message, reason="INVALID_PATH") from None
            first_error = first_error or exc
            continue
        last_target = target
        decision = _with_body_model(route, target, body_model)
        if matches(route.match, decision.target):
            return decision
    if last_target is None and first_error is not None:
        raise SidecarError(first_error.code, first_error.message, reason="INVALID_PATH")
    assert last_target is not None
    shown = _with_body_model(config.default_route, last_target, body_model).target
    raise SidecarError(403, _denied_message(shown, config), reason="NO_MATCHING_ROUTE")


def _with_body_model(route: Route, target: Target, body_model: str | None) -> Decision:
    """Apply the route's aliases to the path's model, or to the body's for OpenAI-compatible calls."""
    if body_model is not None and needs_body_model(target):
        publisher, model = split_openai_model(body_model)
        resolved = route.aliases.get(model, model)
        rewritten = None if resolved == model else (f"{publisher}/{resolved}" if publisher else resolved)
        return Decision(route, with_model(target, resolved), rewritten)
    if target.model is not None and target.model in route.aliases:
        return Decision(route, with_model(target, route.aliases[target.model]))
    return Decision(route, target)


def _denied_message(target: Target, config: Config) -> str:
    asked = (f"project={target.project} location={target.location or 'global'} "
             f"model={target.model or '(none named)'}")
    rules = "; ".join(
        f"{r.name}: projects={list(r.match.projects)} locations={list(r.match.locations)} "
        f"models={list(r.match.models)}" for r in config.routes
    )
    return (f"no route of this sidecar allows {asked}. Routes tried in order: {rules}. "
            "Ask your platform team to extend the VertexRoute, or call an allowed project/location/model.")
