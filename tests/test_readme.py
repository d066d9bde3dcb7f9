"""CI must run exactly the test command the README gives users."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _code_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = readme.split("```bash")[1:3]
    serve, test = (block.split("```")[0].strip() for block in blocks)
    assert "lmcache server --l1-size-gb" in serve
    assert "pytest" in test or "scripts/test.sh" in test
    assert test in _code_lines((ROOT / ".ci" / "run").read_text())
