"""The mutation-testing tool (tests/mutation.py) on a toy project: which mutants it makes, which tests it runs,
and that it reports exactly the mutants the toy's tests miss."""

from __future__ import annotations

import ast
import json
import signal
import textwrap
from pathlib import Path

import pytest

from tests import mutation

TOY = textwrap.dedent('''\
    """A toy module: this docstring, f-strings, asserts and pragma lines are never mutated."""


    def clip_low(x: int, lo: int = 0) -> int:
        if x < lo:
            return lo
        return x


    def scale(x: float) -> float:
        assert x == x
        return float(x) * 2  # pragma: no mutate


    def checked(n: int) -> int:
        if n > 3:
            raise ValueError(f"n={n + 1} too big")
        return n
''')

# Pins clip_low; pins `checked`'s limit only through the values 2 and 5; never calls scale.
TOY_TEST = textwrap.dedent('''\
    import pytest

    from toypkg.sub.toy import checked, clip_low


    def test_clip_low():
        assert clip_low(-2) == 0 and clip_low(5) == 5 and clip_low(1, 4) == 4 and clip_low(4, 4) == 4


    def test_checked():
        assert checked(2) == 2
        with pytest.raises(ValueError):
            checked(5)
''')


@pytest.fixture
def toy_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # the project's layout: package/sub/name.py is tested by tests/sub/test_name.py
    (tmp_path / "toypkg" / "sub").mkdir(parents=True)
    (tmp_path / "toypkg" / "__init__.py").write_text("")
    (tmp_path / "toypkg" / "sub" / "__init__.py").write_text("")
    (tmp_path / "toypkg" / "sub" / "toy.py").write_text(TOY)
    (tmp_path / "tests" / "sub").mkdir(parents=True)
    (tmp_path / "tests" / "sub" / "test_toy.py").write_text(TOY_TEST)
    monkeypatch.setattr(mutation, "ROOT", tmp_path)
    return tmp_path


def _by_line(mutants: list[mutation.Mutant]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for m in mutants:
        out.setdefault(m.line, []).append(m.mutated)
    return out


def test_mutants_are_one_line_changes_that_parse_and_skip_docs_messages_asserts_and_pragma_lines(toy_root):
    mutants = mutation.mutants_of(toy_root / "toypkg" / "sub" / "toy.py")
    lines = _by_line(mutants)
    assert lines[4] == ["(1)"]  # the default 0 -> 1 (the annotation is not mutated)
    assert lines[5] == ["(x <= lo)"]
    assert sorted(lines[16]) == ["(4)", "(n >= 3)"]
    assert lines[17] == ["pass  [raise -> pass]"]  # the message (an f-string with `n + 1`) is left alone
    assert not set(lines) & {1, 11, 12}  # docstring, assert, pragma line
    original = TOY.splitlines()
    for m in mutants:
        assert m.path == "toypkg/sub/toy.py"
        ast.parse(m.source)
        changed = [i + 1 for i, (a, b) in enumerate(zip(original, m.source.splitlines(), strict=True)) if a != b]
        assert changed == [m.line], m.label()


def test_a_modules_tests_are_its_focused_set_else_its_mirror_file_then_the_files_importing_it(toy_root,
                                                                                            monkeypatch):
    (toy_root / "tests" / "test_user.py").write_text("from toypkg.sub import toy\n")
    (toy_root / "tests" / "test_other.py").write_text("import toypkg.sub.toyish\n")  # a different module
    module = toy_root / "toypkg" / "sub" / "toy.py"
    assert mutation.tests_for(module, []) == [["tests/sub/test_toy.py"], ["tests/test_user.py"]]
    assert mutation.tests_for(module, ["x.py"])[-1] == ["x.py"]
    monkeypatch.setitem(mutation.FOCUSED_TESTS, "toypkg/sub/toy.py", ["tests/test_user.py", "-k", "a"])
    assert mutation.tests_for(module, []) == [["tests/test_user.py", "-k", "a"], ["tests/sub/test_toy.py"]]


def test_a_run_kills_the_mutants_the_tests_notice_and_reports_exactly_the_survivors(toy_root, tmp_path_factory):
    report = tmp_path_factory.mktemp("out") / "report.json"
    handler = signal.getsignal(signal.SIGTERM)
    rc = mutation.main([str(toy_root / "toypkg" / "sub" / "toy.py"), "--own-only", "--spawn", "--report", str(report)])
    assert rc == 0
    (result,) = json.loads(report.read_text())
    n = len(mutation.mutants_of(toy_root / "toypkg" / "sub" / "toy.py"))
    # `n > 3` -> `n >= 3` and the limit 3 -> 4 survive: the test never tries n = 3 or 4 (missing tests);
    # `x < lo` -> `x <= lo` survives too: at x == lo both return the same value (an equivalent mutant).
    assert sorted(result["survived"]) == sorted([
        "toypkg/sub/toy.py:5: x < lo  ->  (x <= lo)",
        "toypkg/sub/toy.py:16: n > 3  ->  (n >= 3)",
        "toypkg/sub/toy.py:16: 3  ->  (4)",
    ])
    assert result["killed"] == n - 3 and result["not_run"] == 0 and result["module"] == "toypkg/sub/toy.py"
    assert (toy_root / "toypkg" / "sub" / "toy.py").read_text() == TOY  # the real tree is never touched
    assert signal.getsignal(signal.SIGTERM) is handler  # the caller's SIGTERM handling is back


def test_a_shuffled_run_continued_with_skip_runs_the_rest_of_the_same_order(toy_root, capsys):
    module = toy_root / "toypkg" / "sub" / "toy.py"

    def listed(*extra: str) -> list[str]:
        mutation.main([str(module), "--list", "--shuffle", "7", *extra])
        return [ln.strip() for ln in capsys.readouterr().out.splitlines() if ln.startswith("   toypkg")]

    whole = listed()
    assert sorted(whole) == sorted(m.label() for m in mutation.mutants_of(module)) and len(whole) == 5
    assert listed("--skip", "4") == whole[4:]
    assert sorted(listed("--lines", "16")) == sorted(m for m in whole if m.startswith("toypkg/sub/toy.py:16:"))


def test_a_tree_whose_tests_fail_unmutated_is_refused(toy_root):
    (toy_root / "tests" / "sub" / "test_toy.py").write_text("def test_fails():\n    assert False\n")
    with pytest.raises(SystemExit, match="baseline tests fail on the unmutated tree"):
        mutation.main([str(toy_root / "toypkg" / "sub" / "toy.py"), "--own-only", "--spawn"])
