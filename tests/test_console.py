"""What a person sees: `geximpute evaluate` on a terminal and under CI, its log file, and its report.html in Chromium.

The runs are real subprocesses of the command line (their own local Ray), with the baselines only so that each
takes seconds; the hybrid's stages report through the same display (see test_progress_counts_ray_work).
"""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from browser import find_chromium, non_blank_fraction, open_page

from geximpute.runtime.console import LOG_NAME

GEXIMPUTE = [sys.executable, "-m", "geximpute.apps.cli"]
BASELINES = "evaluation.methods=[distance, row_tissue, tissue_donor]"
#: half the donors held out whole, so that each (gene, tissue) has several hidden individuals to correlate across
HELD_OUT_DONORS = ["evaluation.task=samples", "evaluation.whole_donors=true", "evaluation.fraction=0.5",
                   "evaluation.min_donors=5"]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "GITHUB_ACTIONS")}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", **extra)
    return env


def _evaluate_args(config: Path, out: Path, *extra: str) -> list[str]:
    sets = [item for key in (BASELINES, *HELD_OUT_DONORS, "ray.num_cpus=2") for item in ("--set", key)]
    return [*GEXIMPUTE, "evaluate", "--config", str(config), *sets, "--out", str(out), *extra]


def run_piped(args: list[str], env: dict) -> tuple[int, str]:
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=400)
    return proc.returncode, proc.stdout + proc.stderr


def run_on_terminal(args: list[str], env: dict) -> tuple[int, str]:
    """Run ``args`` with stdout and stderr on a pseudo-terminal, as in an interactive shell."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows x 120 columns
    proc = subprocess.Popen(args, env={**env, "COLUMNS": "120", "TERM": "xterm"}, stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=400), b"".join(chunks).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def evaluated_ci(synth_small, tmp_path_factory) -> tuple[Path, int, str]:
    """`geximpute evaluate` with CI=true and its output piped, as in a CI job or `ray job` logs."""
    out = tmp_path_factory.mktemp("console") / "eval"
    rc, text = run_piped(_evaluate_args(synth_small / "config.yaml", out), _env(CI="true"))
    return out, rc, text


def _check_log(out: Path, text: str, ray_lines: tuple[str, ...] = ("Started a local Ray instance", "core_worker")
               ) -> None:
    log = out.absolute() / LOG_NAME  # the output folder is a link to its newest version
    assert f"log file {log}" in text
    body = log.read_text()
    # Ray's own lines are in the file and not on the screen
    for ray_line in ray_lines:
        assert ray_line in body, f"{ray_line!r} not in {log}"
        assert ray_line not in text
    assert "logging_progress" not in text and "deprecated" not in text
    assert "Mean of empty slice" not in body  # fixed at its cause, not filtered


def test_ci_output_is_short_with_a_line_per_stage(evaluated_ci):
    out, rc, text = evaluated_ci
    assert rc == 0, text
    lines = text.splitlines()
    assert len(lines) < 40, text
    _check_log(out, text)
    # every stage ends with a plain line naming it, with done/total of its units
    for stage in (r"prepare: context records: (\d+)/\1 blocks in", "baselines: 3/3 methods in", "load inputs: done in"):
        assert any(re.search(stage, line) for line in lines), f"no {stage!r} in:\n{text}"
    assert "\r" not in text and "\x1b[" not in text  # no bar redraws or colours off a terminal
    assert "pearson" in text and "report.html" in text


def test_terminal_output_is_short_with_live_bars(ray_local, synth_small, tmp_path):
    # this run joins the session's Ray (the piped run above starts a local one of its own)
    address = ray_local.get_runtime_context().gcs_address
    out = tmp_path / "eval"
    rc, text = run_on_terminal(_evaluate_args(synth_small / "config.yaml", out, "--set", f"ray.address={address}"),
                               _env())
    assert rc == 0, text
    assert text.count("\n") < 40, text
    _check_log(out, text, ray_lines=("Connecting to existing Ray cluster",))
    # tqdm bars: name, done/total, rate (redrawn with carriage returns on the same line)
    assert "prepare: context records: 100%" in text and "1/1 [" in text, text
    assert "methods/s" in text
    assert "\r" in text


def test_failure_names_the_log(synth_small, tmp_path):
    out = tmp_path / "eval"
    bad = tmp_path / "broken.gct"
    bad.write_text("this is not a GCT file\n")
    rc, text = run_piped(_evaluate_args(synth_small / "config.yaml", out, "--set", f"inputs.expression={bad}"),
                         _env(CI="true"))
    assert rc == 2, text
    assert "error:" in text and "broken.gct" in text
    assert "output is in" in text
    logged = [p for p in tmp_path.iterdir() if p.name.startswith(f".eval.{LOG_NAME}")]
    assert logged and str(logged[0]) in text


def test_report_opens_in_chromium(evaluated_ci):
    out, rc, text = evaluated_ci
    assert rc == 0, text
    report = out / "report.html"
    page = report.read_text()
    # self-contained: every image is inline, nothing is fetched
    assert 'src="http' not in page and "<script" not in page and "<link" not in page
    browser = find_chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (scripts/test.sh installs it with apt-get where apt exists)")
    load = open_page(browser, report)
    assert load.errors == [], load.errors
    assert load.title.startswith("geximpute evaluate")
    # observed vs predicted, per tissue, across individuals: three plots, each decoded and drawn
    assert len(load.images) == 3
    for image in load.images:
        assert image["complete"] and image["naturalWidth"] > 100, image
        assert image["width"] > 100 and image["height"] > 100, image
        assert non_blank_fraction(load.screenshot, image) > 0.01, image  # axes, labels and data: ink
    # the check can fail: the page's margin left of the plots is blank in the same screenshot
    margin = {"x": 0, "y": load.images[0]["y"], "width": 10, "height": load.images[0]["height"]}
    assert non_blank_fraction(load.screenshot, margin) < 0.01


@pytest.mark.slow  # a third Ray run of ~15 s; the default suite has the quiet ones
def test_verbose_shows_ray_live(synth_small, tmp_path):
    out = tmp_path / "eval"
    args = _evaluate_args(synth_small / "config.yaml", out)
    rc, text = run_piped([*args[:3], "-v", *args[3:]], _env(CI="true"))
    assert rc == 0, text
    assert "Started a local Ray instance" in text  # Ray's own lines on the screen
    assert "DEBUG" in text or "evaluate: distance" in text  # and the engine's detail lines
    assert "baselines: 3/3 methods in" in text  # the stage lines as well
    assert "prepare: context records" in (out / LOG_NAME).read_text()  # the file keeps the engine's lines


def test_the_log_goes_into_the_folder_the_command_writes(synth_small, tmp_path):
    import argparse

    from geximpute.apps import cli

    config = synth_small / "config.yaml"

    def folder(command: str, *sets: str) -> Path:
        args = argparse.Namespace(command=command, config=str(config), overrides=list(sets), out=None)
        return cli._output_folder(args)

    out = tmp_path / "preds"
    assert folder("impute", f"output_dir={tmp_path}") == tmp_path / "predictions"
    assert folder("impute", f"output_dir={tmp_path}", f"impute.out_dir={out}") == out  # where impute writes
    assert folder("nightly", f"output_dir={tmp_path}") == tmp_path  # beside the nightly dataset, not in it
    assert folder("fit-head", f"output_dir={tmp_path}") == tmp_path / "model"
    assert folder("fit-head", f"output_dir={tmp_path}", f"impute.model_dir={out}") == out  # where it writes


def test_each_nightly_run_keeps_its_own_log(synth_small, tmp_path, monkeypatch):
    """Every night writes into the same folder: each run's log was moved onto `_geximpute.log`, replacing the last
    night's (only failed nights kept theirs)."""
    from geximpute.apps import cli

    args = cli.build_parser().parse_args(["nightly", "--config", str(synth_small / "config.yaml"),
                                          "--set", f"output_dir={tmp_path}", "-q"])
    nights = iter(["20261201T020000Z", "20261202T020000Z"])
    assert re.fullmatch(r"_geximpute-nightly-\d{8}T\d{6}Z\.log", cli._log_name("nightly"))
    assert cli._log_name("impute") == LOG_NAME
    monkeypatch.setattr(cli, "_log_name", lambda command: f"_geximpute-{command}-{next(nights)}.log")
    for _ in range(2):
        args.func = lambda a: logging.getLogger("geximpute").warning("a night's work") or 0
        assert cli._run_in_session(args) == 0
    logs = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("_geximpute"))
    assert logs == ["_geximpute-nightly-20261201T020000Z.log", "_geximpute-nightly-20261202T020000Z.log"]
    assert all("a night's work" in (tmp_path / name).read_text() for name in logs)


def test_plan_options_without_plan_are_a_usage_error(synth_small, capsys):
    """`impute --workers 8` without `--plan` ran a whole imputation with the option silently ignored."""
    from geximpute.apps import cli

    for extra in (["--workers", "8"], ["--json"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["impute", "--config", str(synth_small / "config.yaml"), *extra])
        assert exit_.value.code == 2
        assert "--workers and --json shape the plan: give them with --plan" in capsys.readouterr().err


def test_quiet_keeps_progress_off_the_terminal_and_in_the_log(tmp_path, capfd, monkeypatch):
    """``-q``: only warnings and errors on the terminal; a stage's progress lines went there all the same (a
    nightly job run with -q, where any output reads as an alert); they go to the log file."""
    from geximpute.runtime.console import session, stage

    monkeypatch.setattr("geximpute.runtime.console.interactive", lambda stream: False)
    monkeypatch.setenv("GEXIMPUTE_PROGRESS_SECONDS", "0.2")
    log_file = tmp_path / "run.log"
    with session(log_file, quiet=True):
        with stage("prepare: records", total=3, unit="blocks") as progress:
            time.sleep(1.0)
            progress.advance(3)
        logging.getLogger("geximpute").warning("one warning")
    err = capfd.readouterr().err
    assert "prepare: records" not in err and "one warning" in err
    assert "prepare: records: 3/3 blocks in" in log_file.read_text()


def test_a_stage_an_error_left_open_ends_with_its_session(tmp_path, capfd, monkeypatch):
    """A stage made before its ``with`` (or never entered) when an error ends the command: its display thread kept
    drawing over the error line and raised once the session was gone; the session ends it first."""
    import threading

    from geximpute.runtime.console import session, stage

    monkeypatch.setattr("geximpute.runtime.console.interactive", lambda stream: False)
    monkeypatch.setenv("GEXIMPUTE_PROGRESS_SECONDS", "0.2")
    errors = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    with pytest.raises(RuntimeError, match="the step failed"), session(tmp_path / "run.log") as current:
        progress = stage("train: networks", total=4, unit="epochs")
        progress.advance()
        raise RuntimeError("the step failed")
    assert progress._closed and not progress._thread.is_alive() and current.stages == []
    time.sleep(0.7)  # a thread left running would tick (and fail) by now
    assert errors == []
    assert "train: networks" in capfd.readouterr().err
