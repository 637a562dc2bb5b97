"""Entry points for running geximpute's steps as Ray jobs: ``python -m geximpute.jobs.NAME --config FILE [--set k=v
...]``.

Each module is a thin ``main()`` over the ``geximpute`` command line (:mod:`geximpute.apps.cli`): it takes the config
and
its overrides, runs one step (``pipeline`` runs them in order) and returns the step's exit status. The same command
runs on a laptop (a local Ray starts in the process), as a Ray job (``geximpute submit``, ``ray job submit``), on a
cluster launched with ``ray up`` and in a KubeRay ``RayJob``.

The repository's ``jobs/`` folder installs as ``geximpute.jobs`` (``pyproject.toml`` maps ``engine/`` to ``geximpute``
and ``jobs/`` to ``geximpute.jobs``), so the entry points work from any folder once geximpute is installed;
``geximpute submit`` also ships the local sources in the job's ``working_dir`` as ``geximpute/``, where they take
precedence over an installed copy.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def step_args(name: str, argv: Sequence[str] | None, description: str | None = None) -> list[str]:
    """Parse ``--config FILE [--set KEY=VALUE ...]`` and return them as ``geximpute`` arguments.

    Args:
        name: the job's module name, for ``--help`` and error messages.
        argv: the arguments after ``python -m geximpute.jobs.NAME`` (``None``: ``sys.argv[1:]``).
        description: what the job does, for ``--help`` (the job module's docstring).

    Returns:
        ``["--config", FILE, "--set", KEY=VALUE, ...]``, ready to follow a ``geximpute`` subcommand.
    """
    parser = argparse.ArgumentParser(prog=f"python -m geximpute.jobs.{name}", description=description)
    parser.add_argument("--config", required=True, metavar="FILE", help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=2 (repeatable)")
    args = parser.parse_args(argv)
    forwarded = ["--config", args.config]
    for item in args.overrides:
        forwarded += ["--set", item]
    return forwarded


def run_steps(name: str, steps: Sequence[Sequence[str]], forwarded: list[str]) -> int:
    """Run ``geximpute`` subcommands ``steps`` in order with the same ``forwarded`` arguments, in this process;
    returns 0, or the exit status of the first that failed (the later ones are not run)."""
    import sys

    from geximpute.apps import cli

    for step in steps:
        print(f"{name}: geximpute {' '.join(step)}", flush=True)
        status = cli.main([*step, *forwarded])
        if status != 0:
            print(f"{name}: `geximpute {step[0]}` failed with exit status {status}; later steps not run",
                  file=sys.stderr, flush=True)
            return status
    print(f"{name}: all steps succeeded", flush=True)
    return 0
