"""Pricing table: hand-computed costs, matching, overrides, labels."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vertex_sidecar.pricing import (
    CostResult,
    PricingError,
    PricingTable,
    model_id,
    normalise_model,
)
from vertex_sidecar.usage import Usage, new_usage_parser

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "usage"


@pytest.fixture(scope="module")
def table() -> PricingTable:
    return PricingTable.default()


def usd(table: PricingTable, model: str, **counts: object) -> float:
    result = table.cost(model, Usage(found=True, **counts))  # type: ignore[arg-type]
    assert result.pricing == "known"
    return result.usd


# --------------------------------------------------------------------------- the default


def test_default_table_loads_from_package_data(table: PricingTable) -> None:
    assert table.as_of == "2026-11-26"
    assert table is PricingTable.default()  # loaded once
    assert PricingTable.load() is table
    raw = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "sidecar/vertex_sidecar/data/pricing.yaml").read_text()
    )
    for family in ("gemini-3-pro-preview", "gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.0-flash",
                   "gemini-embedding-001", "text-embedding-005", "imagen-4.0-generate",
                   "imagen-3.0-generate", "claude-sonnet-4-5", "claude-opus-4-1", "claude-haiku-4-5"):
        assert family in raw["models"], family
        assert table.lookup(family) is not None


# --------------------------------------------------------------------------- costs by hand


def test_gemini_25_pro_with_cache_and_thinking(table: PricingTable) -> None:
    # 8,000 fresh input x $1.25 + 2,000 cached x $0.125 + 1,000 output (500 thinking) x $10
    cost = usd(table, "gemini-2.5-pro", input_tokens=10_000, cached_input_tokens=2_000,
               output_tokens=1_000, reasoning_tokens=500)
    assert cost == pytest.approx((8_000 * 1.25 + 2_000 * 0.125 + 1_000 * 10.0) / 1e6)


def test_gemini_25_pro_long_context_tier(table: PricingTable) -> None:
    short = usd(table, "gemini-2.5-pro", input_tokens=200_000, output_tokens=1_000)
    assert short == pytest.approx((200_000 * 1.25 + 1_000 * 10.0) / 1e6)
    long = usd(table, "gemini-2.5-pro", input_tokens=200_001, cached_input_tokens=100_000,
               output_tokens=1_000)
    assert long == pytest.approx((100_001 * 2.50 + 100_000 * 0.25 + 1_000 * 15.0) / 1e6)


def test_cached_tokens_use_the_cached_rate(table: PricingTable) -> None:
    all_fresh = usd(table, "gemini-2.5-flash", input_tokens=1_000_000)
    all_cached = usd(table, "gemini-2.5-flash", input_tokens=1_000_000, cached_input_tokens=1_000_000)
    assert all_fresh == pytest.approx(0.30)
    assert all_cached == pytest.approx(0.03)


def test_audio_input_has_its_own_price(table: PricingTable) -> None:
    cost = usd(table, "gemini-2.5-flash", input_tokens=10_000, output_tokens=100,
               input_by_modality={"AUDIO": 6_000, "TEXT": 4_000})
    assert cost == pytest.approx((6_000 * 1.00 + 4_000 * 0.30 + 100 * 2.50) / 1e6)


def test_image_output_tokens_have_their_own_price(table: PricingTable) -> None:
    cost = usd(table, "gemini-2.5-flash-image", input_tokens=20, output_tokens=1_290 + 10,
               output_by_modality={"IMAGE": 1_290, "TEXT": 10})
    assert cost == pytest.approx((20 * 0.30 + 1_290 * 30.0 + 10 * 2.50) / 1e6)


def test_anthropic_cache_reads_and_writes(table: PricingTable) -> None:
    parser = new_usage_parser("anthropic", "rawPredict")
    parser.feed((FIXTURES / "anthropic_raw.json").read_bytes())
    usage = parser.result()
    cost = table.cost("publishers/anthropic/models/claude-sonnet-4-5@20250929", usage)
    # 412 fresh x $3 + 2,048 cache reads x $0.30 + 1,024 cache writes x $3.75 + 96 out x $15
    assert cost == CostResult(pytest.approx((412 * 3 + 2_048 * 0.30 + 1_024 * 3.75 + 96 * 15) / 1e6), "known")  # type: ignore[arg-type]


def test_gemini_fixture_end_to_end(table: PricingTable) -> None:
    parser = new_usage_parser("google", "generateContent")
    parser.feed((FIXTURES / "gemini_generate_thinking.json").read_bytes())
    cost = table.cost("gemini-2.5-flash", parser.result())
    # 1,301 input x $0.30 + (42 + 537 thinking) output x $2.50
    assert cost.usd == pytest.approx((1_301 * 0.30 + 579 * 2.50) / 1e6)


def test_imagen_is_priced_per_image(table: PricingTable) -> None:
    assert usd(table, "imagen-4.0-generate-001", images=4) == pytest.approx(0.16)
    assert usd(table, "imagen-4.0-fast-generate-001", images=1) == pytest.approx(0.02)
    assert usd(table, "imagen-3.0-generate-002", images=2) == pytest.approx(0.08)


def test_embeddings_priced_per_character_or_token(table: PricingTable) -> None:
    assert usd(table, "text-embedding-005", input_tokens=2_065, billable_characters=8_243) == (
        pytest.approx(8_243 * 0.025 / 1e6)
    )
    assert usd(table, "gemini-embedding-001", input_tokens=1_000) == pytest.approx(1_000 * 0.15 / 1e6)


def test_reasoning_defaults_to_output_price_and_can_differ() -> None:
    table = PricingTable({"models": {"m": {"input": 1, "output": 2}, "r": {"input": 1, "output": 2, "reasoning": 5}}})
    assert table.cost("m", Usage(output_tokens=10, reasoning_tokens=4)).usd == pytest.approx(20 / 1e6)
    assert table.cost("r", Usage(output_tokens=10, reasoning_tokens=4)).usd == pytest.approx((6 * 2 + 4 * 5) / 1e6)


def test_unknown_model_costs_zero_and_says_so(table: PricingTable) -> None:
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000, found=True)
    assert table.cost("gemini-9-ultra", usage) == CostResult(0.0, "unknown")
    assert table.cost("", usage) == CostResult(0.0, "unknown")
    assert table.cost("../../etc/passwd", usage) == CostResult(0.0, "unknown")
    # A TTS variant must not be priced silently as plain gemini-2.5-flash.
    assert table.cost("gemini-2.5-flash-preview-tts", usage).pricing == "unknown"


def test_count_tokens_is_free(table: PricingTable) -> None:
    usage = Usage(input_tokens=31, total_tokens=31, found=True, billable=False)
    assert table.cost("gemini-2.5-pro", usage) == CostResult(0.0, "known")


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("gemini-2.0-flash-001", "gemini-2.0-flash"),
        ("publishers/google/models/gemini-2.0-flash-lite-001", "gemini-2.0-flash-lite"),
        ("projects/p/locations/us-central1/publishers/google/models/gemini-2.5-flash", "gemini-2.5-flash"),
        ("gemini-2.5-flash-preview-09-2025", "gemini-2.5-flash"),
        ("gemini-2.5-flash-lite-preview-06-17", "gemini-2.5-flash-lite"),
        ("google/gemini-2.5-pro", "gemini-2.5-pro"),
        ("Gemini-2.5-Pro", "gemini-2.5-pro"),
        ("claude-sonnet-4-5@20250929", "claude-sonnet-4-5"),
        ("claude-3-5-sonnet-v2@20241022", "claude-3-5-sonnet-v2"),
        ("claude-opus-4@20250514", "claude-opus-4"),
        ("imagen-4.0-ultra-generate-001", "imagen-4.0-ultra-generate"),
    ],
)
def test_most_specific_match_and_family(table: PricingTable, model: str, family: str) -> None:
    assert table.family(model) == family
    assert normalise_model(model) == family


def test_more_specific_glob_wins() -> None:
    table = PricingTable({"models": {
        "gem-*": {"input": 1},
        "gem-2*": {"input": 2},
        "gem-2-lite*": {"input": 3},
        "gem-2-lite-x": {"input": 4},
    }})
    assert table.cost("gem-1", Usage(input_tokens=10**6)).usd == pytest.approx(1)
    assert table.cost("gem-2-pro", Usage(input_tokens=10**6)).usd == pytest.approx(2)
    assert table.cost("gem-2-lite-001", Usage(input_tokens=10**6)).usd == pytest.approx(3)
    assert table.cost("gem-2-lite-x", Usage(input_tokens=10**6)).usd == pytest.approx(4)
    assert table.family("gem-2-lite-001") == "gem-2-lite"


@pytest.mark.parametrize(
    ("model", "label"),
    [
        ("my-tuned-model-7", "my-tuned-model-7"),
        ("meta/llama-3.3-70b-instruct-maas", "llama-3.3-70b-instruct-maas"),
        ("", "other"),
        ("../../etc/passwd", "other"),
        ("gemini 2.5 pro", "other"),
        ("x" * 200, "other"),
        ("gemini-2.5-pro\n", "gemini-2.5-pro"),
        ("DROP TABLE models;--", "other"),
        ("publishers/google/models/", "other"),
    ],
)
def test_normalise_model_labels(model: str, label: str) -> None:
    assert normalise_model(model) == label


def test_model_id() -> None:
    assert model_id("projects/p/locations/global/publishers/anthropic/models/claude-haiku-4-5@20251001") == "claude-haiku-4-5"
    assert model_id("models/gemini-2.0-flash") == "gemini-2.0-flash"
    assert model_id("a/b/c/d") is None


# --------------------------------------------------------------------------- overrides


def test_override_merging(table: PricingTable) -> None:
    merged = PricingTable.load({
        "models": {
            "gemini-2.5-pro": {"input": 1.0},  # only this field changes
            "claude-3-haiku": None,  # removed
            "my-tuned-model": {"input": 0.5, "output": 1.5, "aliases": ["my-tuned-model-*"]},
        }
    })
    cost = merged.cost("gemini-2.5-pro", Usage(input_tokens=100_000, output_tokens=10**6))
    assert cost.usd == pytest.approx(0.1 + 10.0)
    long = merged.cost("gemini-2.5-pro", Usage(input_tokens=300_000))
    assert long.usd == pytest.approx(300_000 * 2.50 / 1e6)  # long-context tier kept
    assert merged.cost("claude-3-haiku@20240307", Usage(input_tokens=1)).pricing == "unknown"
    assert merged.cost("my-tuned-model-v3", Usage(input_tokens=10**6)).usd == pytest.approx(0.5)
    # The default is untouched.
    assert table.cost("gemini-2.5-pro", Usage(input_tokens=100_000)).usd == pytest.approx(0.125)
    assert table.cost("claude-3-haiku", Usage(input_tokens=10**6)).pricing == "known"
    assert merged.as_of == table.as_of


@pytest.mark.parametrize(
    "overrides",
    [
        {"models": {"m": {"input": -1}}},
        {"models": {"m": {"input": "cheap"}}},
        {"models": {"m": {"inptu": 1}}},
        {"models": {"m": {"input_by_modality": {"audio": 1}}}},
        {"models": {"m": {"long_context": {"input": 2}}}},
        {"models": {"m": {"aliases": "m-*"}}},
        {"models": {"M!": {"input": 1}}},
        {"models": ["m"]},
        {"model": {}},
        {"models": {"m": True}},
    ],
)
def test_invalid_overrides_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(PricingError):
        PricingTable.load(overrides)


def test_lookup_memo_is_bounded(table: PricingTable) -> None:
    fresh = PricingTable({"models": {"a*": {"input": 1}}})
    for i in range(10_000):
        fresh.lookup(f"zz-{i}")
    assert len(fresh._memo) <= 4096
