"""``banbus.__all__`` matches what the package really exports (httpx-style)."""

from __future__ import annotations

import banbus


def test_all_is_sorted() -> None:
    assert banbus.__all__ == sorted(banbus.__all__)
    assert len(set(banbus.__all__)) == len(banbus.__all__)


def test_all_matches_the_public_names() -> None:
    exported = {
        name
        for name, value in vars(banbus).items()
        if not name.startswith("_") and getattr(value, "__module__", "").startswith("banbus")
    }
    exported.add("__version__")
    assert set(banbus.__all__) == exported


def test_version() -> None:
    assert isinstance(banbus.__version__, str)
    assert banbus.__version__.count(".") >= 2
