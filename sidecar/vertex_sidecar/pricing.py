"""Cost in USD of a response's token usage, from a pricing table.

Public API
----------
``PricingTable(spec)``
    Built from a mapping shaped like ``data/pricing.yaml`` (``{"models": {...}}``, see the
    comments there). Invalid specs raise ``PricingError`` (a ``ValueError``).

    - ``PricingTable.default()``: the packaged table (loaded once, via importlib.resources).
    - ``PricingTable.load(overrides=None)``: the default merged with config overrides.
    - ``table.merged(overrides)``: a new table. Per model, override fields replace the
      default's fields (so ``{input: 1.0}`` changes just the input price; a
      ``long_context`` or ``aliases`` override replaces that whole field); ``null`` for a
      model removes it; new models are added.
    - ``table.lookup(model) -> ModelPrice | None`` and ``table.family(model) -> str | None``.
    - ``table.cost(model, usage) -> CostResult(usd, pricing)``: ``pricing`` is ``"known"``
      when the model is in the table, else ``"unknown"`` with ``usd == 0.0``. Calls that
      are not billable (countTokens) cost 0.

``normalise_model(model, table=None) -> str``
    A low-cardinality metric label: for known models the table key or exact alias they
    match, ids matched by a glob alias map to their entry's key (``gemini-2.0-flash-001``
    → ``gemini-2.0-flash``; ``claude-sonnet-4-5@20250929`` → ``claude-sonnet-4-5``); the
    bare model id for other sane ids; ``"other"`` for anything else.

Matching: model names are reduced to an id (``projects/.../publishers/x/models/ID@ver`` →
``ID``, lowercase). An exact key or alias wins; otherwise the glob with the longest literal
prefix (then the longest pattern) wins.

Cost: fresh input tokens at ``input`` (or ``input_by_modality`` for the tokens of those
modalities), cached tokens at ``cached_input``, Anthropic cache writes at ``cache_write``,
output at ``output`` (``output_by_modality`` likewise), thinking tokens at ``reasoning``,
plus ``per_image`` per generated image; when input exceeds ``long_context.threshold`` the
long-context prices apply to the whole request. Models priced per character
(``input_per_1m_chars``) use the response's billable character count instead of tokens.
Modality prices apply to non-cached tokens, up to each modality's reported count.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from types import MappingProxyType
from typing import Any, Final, Literal, Mapping

import yaml

from .usage import Usage

__all__ = [
    "CostResult",
    "ModelPrice",
    "PricingError",
    "PricingTable",
    "Rates",
    "model_id",
    "normalise_model",
]

_PER_TOKEN: Final = 1e-6  # prices are per 1M tokens (or characters)
_CACHE_SIZE: Final = 4096  # lookups memoised; bounded so odd model names cannot grow it

_MODEL_NAME = re.compile(
    r"(?:projects/[a-z0-9._-]+/locations/[a-z0-9-]+/)?"
    r"(?:(?:publishers/[a-z0-9._-]+/)?models/|[a-z0-9._-]+/)?"
    r"(?P<id>[a-z0-9][a-z0-9._-]{0,79})"
    r"(?:@[a-z0-9._-]{1,40})?"
)


class PricingError(ValueError):
    """The pricing table (default or override) is malformed."""


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per 1M tokens (``per_image`` per image, ``input_per_1m_chars`` per 1M chars)."""

    input: float = 0.0
    output: float = 0.0
    cached_input: float | None = None
    cache_write: float | None = None
    reasoning: float | None = None
    input_by_modality: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    output_by_modality: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    per_image: float = 0.0
    input_per_1m_chars: float | None = None


@dataclass(frozen=True, slots=True)
class ModelPrice:
    family: str
    rates: Rates
    long_context_threshold: int | None = None
    long_context: Rates | None = None

    def rates_for(self, input_tokens: int) -> Rates:
        threshold = self.long_context_threshold
        if threshold is not None and self.long_context is not None and input_tokens > threshold:
            return self.long_context
        return self.rates


@dataclass(frozen=True, slots=True)
class CostResult:
    usd: float
    pricing: Literal["known", "unknown"]


def model_id(model: str) -> str | None:
    """The bare model id of a model name or resource path, or None if it is not sane."""
    match = _MODEL_NAME.fullmatch(model.strip().lower())
    return match.group("id") if match else None


# --------------------------------------------------------------------------- parsing

_RATE_FIELDS: Final = frozenset(f.name for f in fields(Rates))
_ENTRY_FIELDS: Final = _RATE_FIELDS | {"aliases", "long_context"}
_TOP_FIELDS: Final = frozenset({"models", "as_of", "source"})
_MODALITY = re.compile(r"[A-Z][A-Z_]{0,31}")
_GLOB_CHARS = re.compile(r"[*?\[]")
_KEY = re.compile(r"[a-z0-9*?\[\]._-]{1,100}")


def _price(where: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise PricingError(f"{where}: expected a non-negative number, got {value!r}")
    if value > 1e6:
        raise PricingError(f"{where}: {value} USD is not a plausible price")
    return float(value)


def _modality_prices(where: str, value: object) -> Mapping[str, float]:
    if not isinstance(value, Mapping):
        raise PricingError(f"{where}: expected a mapping of MODALITY: price")
    out: dict[str, float] = {}
    for modality, price in value.items():
        if not isinstance(modality, str) or not _MODALITY.fullmatch(modality):
            raise PricingError(f"{where}: {modality!r} is not a modality such as AUDIO or IMAGE")
        out[modality] = _price(f"{where}.{modality}", price)
    return MappingProxyType(out)


def _rates(where: str, spec: Mapping[str, Any], base: Rates | None = None) -> Rates:
    values: dict[str, Any] = {}
    for name in _RATE_FIELDS:
        if name not in spec or spec[name] is None:
            continue
        if name.endswith("_by_modality"):
            values[name] = _modality_prices(f"{where}.{name}", spec[name])
        else:
            values[name] = _price(f"{where}.{name}", spec[name])
    if base is None:
        return Rates(**values)
    merged = {f.name: getattr(base, f.name) for f in fields(Rates)}
    merged.update(values)
    return Rates(**merged)


def _entry(key: str, spec: object) -> tuple[ModelPrice, list[str]]:
    where = f"pricing.models.{key}"
    if not isinstance(spec, Mapping):
        raise PricingError(f"{where}: expected a mapping of prices")
    unknown = set(spec) - _ENTRY_FIELDS
    if unknown:
        raise PricingError(f"{where}: unknown field(s) {sorted(map(str, unknown))}")
    rates = _rates(where, spec)
    threshold: int | None = None
    long_rates: Rates | None = None
    long_spec = spec.get("long_context")
    if long_spec is not None:
        if not isinstance(long_spec, Mapping):
            raise PricingError(f"{where}.long_context: expected a mapping")
        unknown = set(long_spec) - _RATE_FIELDS - {"threshold"}
        if unknown:
            raise PricingError(f"{where}.long_context: unknown field(s) {sorted(map(str, unknown))}")
        raw_threshold = long_spec.get("threshold")
        if isinstance(raw_threshold, bool) or not isinstance(raw_threshold, int) or raw_threshold < 1:
            raise PricingError(f"{where}.long_context.threshold: expected a positive token count")
        threshold = raw_threshold
        long_rates = _rates(f"{where}.long_context", long_spec, base=rates)
    aliases = spec.get("aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise PricingError(f"{where}.aliases: expected a list of model ids or globs")
    patterns = [key, *aliases]
    for pattern in patterns:
        if not _KEY.fullmatch(pattern):
            raise PricingError(f"{where}: {pattern!r} is not a lowercase model id or glob")
    family = key if not _GLOB_CHARS.search(key) else key.rstrip("*-")
    return ModelPrice(family, rates, threshold, long_rates), patterns


def _specificity(pattern: str) -> tuple[int, int]:
    literal = _GLOB_CHARS.search(pattern)
    return (literal.start() if literal else len(pattern), len(pattern))


# --------------------------------------------------------------------------- table


class PricingTable:
    """Model prices with exact and glob matching; see the module docstring."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        if not isinstance(spec, Mapping):
            raise PricingError("pricing: expected a mapping with a 'models' key")
        unknown = set(spec) - _TOP_FIELDS
        if unknown:
            raise PricingError(f"pricing: unknown field(s) {sorted(map(str, unknown))}")
        models = spec.get("models") or {}
        if not isinstance(models, Mapping):
            raise PricingError("pricing.models: expected a mapping of model -> prices")
        self.as_of: str | None = str(spec["as_of"]) if spec.get("as_of") else None
        self._spec: dict[str, Any] = {"models": {}}
        for top in ("as_of", "source"):
            if spec.get(top) is not None:
                self._spec[top] = spec[top]
        self._exact: dict[str, ModelPrice] = {}
        globs: list[tuple[tuple[int, int], re.Pattern[str], ModelPrice]] = []
        for key, entry_spec in models.items():
            if not isinstance(key, str):
                raise PricingError(f"pricing.models: {key!r} is not a model name")
            price, patterns = _entry(key, entry_spec)
            self._spec["models"][key] = dict(entry_spec)
            for pattern in patterns:
                if _GLOB_CHARS.search(pattern):
                    regex = re.compile(fnmatch.translate(pattern))
                    globs.append((_specificity(pattern), regex, price))
                else:  # an exact alias keeps its own name as the metric label
                    self._exact[pattern] = replace(price, family=pattern)
        globs.sort(key=lambda item: item[0], reverse=True)
        self._globs = globs
        self._memo: dict[str, ModelPrice | None] = {}

    @classmethod
    def default(cls) -> PricingTable:
        """The packaged default table (``vertex_sidecar/data/pricing.yaml``)."""
        return _default_table()

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None) -> PricingTable:
        """The default table, merged with ``overrides`` from config when given."""
        table = cls.default()
        return table.merged(overrides) if overrides else table

    def merged(self, overrides: Mapping[str, Any]) -> PricingTable:
        """A new table: ``overrides`` (same shape) applied over this one."""
        if not isinstance(overrides, Mapping):
            raise PricingError("pricing: expected a mapping with a 'models' key")
        unknown = set(overrides) - _TOP_FIELDS
        if unknown:
            raise PricingError(f"pricing: unknown field(s) {sorted(map(str, unknown))}")
        spec = {key: value for key, value in self._spec.items() if key != "models"}
        spec.update({key: value for key, value in overrides.items() if key != "models"})
        models = {key: dict(value) for key, value in self._spec["models"].items()}
        override_models = overrides.get("models") or {}
        if not isinstance(override_models, Mapping):
            raise PricingError("pricing.models: expected a mapping of model -> prices")
        for key, value in override_models.items():
            if value is None:
                models.pop(key, None)
            elif isinstance(value, Mapping) and isinstance(models.get(key), dict):
                models[key].update(value)
            else:
                models[key] = value
        spec["models"] = models
        return PricingTable(spec)

    def lookup(self, model: str) -> ModelPrice | None:
        """The price entry for a model name, or None if the model is not in the table."""
        memo = self._memo
        if model in memo:
            return memo[model]
        found: ModelPrice | None = None
        mid = model_id(model)
        if mid is not None:
            found = self._exact.get(mid)
            if found is None:
                for _, pattern, price in self._globs:
                    if pattern.match(mid):
                        found = price
                        break
        if len(memo) >= _CACHE_SIZE:
            memo.clear()
        memo[model] = found
        return found

    def family(self, model: str) -> str | None:
        price = self.lookup(model)
        return price.family if price is not None else None

    def cost(self, model: str, usage: Usage) -> CostResult:
        """USD cost of ``usage`` on ``model``; unknown models cost 0 with pricing="unknown"."""
        price = self.lookup(model)
        if price is None:
            return CostResult(0.0, "unknown")
        if not usage.billable:
            return CostResult(0.0, "known")
        return CostResult(_usd(price.rates_for(usage.input_tokens), usage), "known")


def _by_modality(
    tokens: int, counts: Mapping[str, int], prices: Mapping[str, float], base: float
) -> float:
    """Cost of ``tokens`` where some modalities have their own price."""
    total = 0.0
    remaining = tokens
    for modality, price in prices.items():
        special = min(counts.get(modality, 0), remaining)
        if special > 0:
            total += special * price
            remaining -= special
    return total + remaining * base


def _usd(rates: Rates, usage: Usage) -> float:
    cached = min(usage.cached_input_tokens, usage.input_tokens)
    written = min(usage.cache_write_tokens, usage.input_tokens - cached)
    fresh = usage.input_tokens - cached - written
    if rates.input_per_1m_chars is not None and usage.billable_characters:
        units = usage.billable_characters * rates.input_per_1m_chars
    else:
        units = _by_modality(fresh, usage.input_by_modality, rates.input_by_modality, rates.input)
    units += cached * (rates.input if rates.cached_input is None else rates.cached_input)
    units += written * (rates.input if rates.cache_write is None else rates.cache_write)
    reasoning = min(usage.reasoning_tokens, usage.output_tokens)
    units += _by_modality(
        usage.output_tokens - reasoning,
        usage.output_by_modality,
        rates.output_by_modality,
        rates.output,
    )
    units += reasoning * (rates.output if rates.reasoning is None else rates.reasoning)
    return units * _PER_TOKEN + usage.images * rates.per_image


@functools.cache
def _default_table() -> PricingTable:
    text = resources.files("vertex_sidecar").joinpath("data/pricing.yaml").read_text("utf-8")
    return PricingTable(yaml.safe_load(text))


def normalise_model(model: str, table: PricingTable | None = None) -> str:
    """Low-cardinality label for metrics: family name, bare sane id, or ``"other"``."""
    if not isinstance(model, str):
        return "other"
    mid = model_id(model)
    if mid is None:
        return "other"
    family = (table or PricingTable.default()).family(mid)
    return family or mid
