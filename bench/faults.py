"""The fault battery: every fault case of tests/test_faults.py and tests/test_lose_nothing.py run for
real, as a table.

    python bench/faults.py [--out docs/faults.md]

Each case is a test (the single source of truth: the same code CI runs); its docstring's first
line says what is expected, pytest's outcome says what was observed. Needs real MNIST like the
tests (../shared/data/mnist or DIST_GAN_TEST_MNIST). Takes about 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


class Table:
    """A pytest plugin that records (case, expected, observed) for each test."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []
        self.expected: dict[str, str] = {}

    def pytest_collection_modifyitems(self, items) -> None:
        for item in items:
            doc = (getattr(item, "function", None).__doc__ or "").strip().splitlines()
            self.expected[item.nodeid] = doc[0] if doc else ""

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            observed = {"passed": "as expected", "skipped": "skipped: "}.get(report.outcome, "FAILED: ")
            if report.outcome == "skipped":
                observed += str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
            elif report.outcome == "failed":
                observed += str(report.longrepr).strip().splitlines()[-1][:160]
            name = report.nodeid.split("::", 1)[1].removeprefix("test_").replace("_", " ")
            self.rows.append((name, self.expected.get(report.nodeid, ""), observed))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the table (markdown) to this file")
    args = parser.parse_args()
    table = Table()
    start = time.perf_counter()
    status = pytest.main([str(REPO / "tests" / "test_faults.py"), str(REPO / "tests" / "test_lose_nothing.py"),
                          "-q", "-p", "no:cacheprovider", "--rootdir", str(REPO)], plugins=[table])
    lines = ["| case | expected | observed |", "|---|---|---|"]
    lines += [f"| {case} | {expected} | {observed} |" for case, expected, observed in table.rows]
    summary = (f"{sum(r[2] == 'as expected' for r in table.rows)}/{len(table.rows)} cases as expected "
               f"in {time.perf_counter() - start:.0f} s")
    text = "\n".join(lines)
    print(text + "\n\n" + summary)
    if args.out:
        Path(args.out).write_text(
            "# Fault battery\n\nEvery fault case of `tests/test_faults.py` and `tests/test_lose_nothing.py` "
            "(the reproductions of issues 13, 24 and 31,\nand the one-line errors), run by "
            "`python bench/faults.py --out docs/faults.md` on "
            f"{time.strftime('%Y-%m-%d')}. What each case guarantees, and what is not\nguaranteed: "
            "[scale.md](scale.md#what-is-guaranteed-and-what-is-not).\n\n"
            f"{text}\n\n{summary}.\n")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
