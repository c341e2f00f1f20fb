"""A hostile user's command lines, each one `error:` sentence (exit 2, nothing changed) or, for a
reader that closes the pipe early, work that goes on: what a second pass over the hardening found."""

from __future__ import annotations

import pytest

from gn_diffusion.cli import run_cli
from gn_diffusion.errors import UserError
from gn_diffusion.run_folder.claim import check_output_path
from conftest import TINY, assert_fails_cleanly, script_main, tiny_config


class ClosedPipe:
    """A stdout whose reader has gone: every write and flush fails as a closed pipe does."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")

    def fileno(self):
        raise ValueError("no file")


def test_a_reader_that_closes_the_pipe_does_not_stop_the_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdout", ClosedPipe())
    done = tmp_path / "done"

    def main(argv):
        print("effective batch ...")  # as train.py's first line
        done.write_text("the work went on")

    run_cli(main, [])
    assert done.read_text() == "the work went on"
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("case", ["a key twice", "a folder", "an option", "a setting without ="])
def test_a_config_argument_that_is_no_config_file_is_named_for_what_it_is(tmp_path, capsys, case):
    twice = tmp_path / "twice.yaml"
    twice.write_text("model:\n  norm: group\n  norm: batch\n")
    arg, message = {
        "a key twice": (str(twice), "gives the key 'norm' twice (line 3); keep one."),
        "a folder": (str(tmp_path), "is a folder; pass the path of a YAML file"),
        "an option": ("--hlep", "unknown option --hlep; the commands take only --help"),
        "a setting without =": ("model.base_channels", "(a setting is written section.key=value)"),
    }[case]
    # TINY and one step: were the argument taken, the run would end at once
    args = [arg, *TINY, "train.max_steps=1", "train.log_with=none", f"train.output_dir={tmp_path / 'run'}"]
    assert_fails_cleanly(capsys, "train.py", args, message, tmp_path)


def test_the_root_of_the_file_system_is_no_output_folder():
    # the check alone: were it to pass, a whole run would write into /
    with pytest.raises(UserError, match="train.output_dir / is the root of the file system"):
        check_output_path(tiny_config("/"))


@pytest.mark.parametrize("setting", ["model.norm=" + "x" * 5000, "model.channel_mult=[" + ",".join(["1"] * 3000) + "]"])
def test_a_huge_bad_value_gives_a_short_line(tmp_path, capsys, setting):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(script_main("train.py"), [*TINY, setting, f"train.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: ") and len(err) < 300, err
    assert not (tmp_path / "run").exists()


def test_an_output_name_whose_temporary_copy_would_be_too_long_is_refused_before_sampling(run_dir, tmp_path, capsys):
    out = tmp_path / "deep" / ("b" * 250)  # fits the file system; ".tmp-<name>-<pid>" beside it does not
    assert_fails_cleanly(capsys, "sample.py", [str(run_dir), f"sample.output_dir={out}"],
                         f"the path {out} is too long for its file system", run_dir)
    assert not (tmp_path / "deep").exists()
