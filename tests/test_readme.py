"""README's two set-up commands, and CI running exactly the test one."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    section = ROOT.joinpath("README.md").read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_readme_has_exactly_two_setup_commands():
    commands = setup_commands()
    assert len(commands) == 2, commands
    train, test = commands
    assert "\n" not in train and "\n" not in test
    assert "torch==2.13.0" in train and train.endswith("python train.py")
    assert "torch==2.13.0" in test and test.endswith("pytest")


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = ROOT.joinpath(".ci", "run").read_text().splitlines()
    assert setup_commands()[1] in ci_lines
