import pytest

from memvisor.errors import InputError
from memvisor.units import GiB, MiB, format_size, pages, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("512MiB", 512 * MiB),
        ("2G", 2 * GiB),
        ("1.5GiB", 3 * GiB // 2),
        ("1GB", 10**9),
        (" 8 k ", 8192),
        (123, 123),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "abc", "-1", "12XB", "1.0000001K", True, None, -5, 1.5])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(InputError, match="memory"):
        parse_size(bad, what="memory")  # type: ignore[arg-type]


def test_format_size() -> None:
    assert format_size(1536 * MiB) == "1.5 GiB"
    assert format_size(2 * GiB) == "2 GiB"
    assert format_size(100) == "100 B"
    assert format_size(-MiB) == "-1 MiB"


def test_pages() -> None:
    assert pages(8192) == 2
    with pytest.raises(InputError):
        pages(100)
