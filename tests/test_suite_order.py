"""The suite's own ordering (tests/conftest.py): every module :data:`LONGEST_FIRST` names exists, so a renamed
module cannot silently drop out of the front of the collection, and collection puts them first, in that order,
leaving every other test where it was."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from tests.conftest import LONGEST_FIRST, pytest_collection_modifyitems

ROOT = Path(__file__).resolve().parents[1]


def test_longest_first_names_existing_modules() -> None:
    missing = [m for m in LONGEST_FIRST if not (ROOT / m).is_file()]
    assert not missing, f"tests/conftest.py LONGEST_FIRST names modules that do not exist: {missing}"
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)


def test_collection_puts_longest_first_in_order() -> None:
    others = ["tests/test_spec.py", "tests/ops/test_moe.py"]
    collected = [SimpleNamespace(path=ROOT / m, n=i) for i, m in
                 enumerate([others[0], *reversed(LONGEST_FIRST), LONGEST_FIRST[0], others[1]])]
    pytest_collection_modifyitems(None, SimpleNamespace(rootpath=ROOT), collected)  # type: ignore[arg-type]
    order = [item.path.relative_to(ROOT).as_posix() for item in collected]
    assert order == [LONGEST_FIRST[0], LONGEST_FIRST[0], *LONGEST_FIRST[1:], *others]
    assert [item.n for item in collected[:2]] == sorted(item.n for item in collected[:2])  # stable within a module
