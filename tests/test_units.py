"""Token counts as users write them, and lengths, totals and sizes as tables print them."""

import pytest

from longctx.units import format_bytes, format_token_total, length_label, parse_byte_count, parse_token_count


@pytest.mark.parametrize(
    "text, tokens",
    [("32768", 32768), ("32k", 32768), ("32K", 32768), ("1M", 2**20), ("1m", 2**20), (" 2 k ", 2048), ("1.5k", 1536), (7, 7)],
)
def test_token_counts_are_binary_multiples(text, tokens):
    assert parse_token_count(text) == tokens


@pytest.mark.parametrize("text", ["", "k", "32 kb", "-1", "0", "0.3k", "1.5", "1e3", "1G"])
def test_token_count_refuses_what_is_not_a_positive_whole_count(text):
    with pytest.raises(ValueError, match="not a"):
        parse_token_count(text)


def test_length_labels_read_like_the_lengths_users_give():
    assert [length_label(n) for n in (300, 1024, 1500, 32768, 2**20)] == ["300", "1K", "1.5k", "32K", "1024K"]
    assert parse_token_count(length_label(32768)) == 32768


def test_totals_and_sizes_are_decimal():
    assert [format_token_total(n) for n in (999, 2**20, 1_400_000_000)] == ["999", "1.0M", "1.4B"]
    assert [format_bytes(n) for n in (512, 1500, 2_500_000, 1_500_000_000)] == ["512 B", "1.5 KB", "2.5 MB", "1.5 GB"]


@pytest.mark.parametrize("text, count", [("5GB", 5 * 10**9), ("500mb", 5 * 10**8), ("80GiB", 80 * 2**30), ("1.5KiB", 1536), ("1024", 1024), ("2 TB", 2 * 10**12)])
def test_byte_counts_are_decimal_or_binary_as_written(text, count):
    assert parse_byte_count(text) == count


@pytest.mark.parametrize("text", ["", "GB", "0MB", "-1GB", "5 GBs", "five GB"])
def test_byte_count_refuses_what_is_not_a_positive_size(text):
    with pytest.raises(ValueError, match="not a"):
        parse_byte_count(text)
