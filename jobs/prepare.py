"""Ray job entry point: the promoter records and the labelled training folds (`geximpute prepare --training
--targets none`)."""

from __future__ import annotations

from collections.abc import Sequence

from geximpute.apps import cli
from geximpute.jobs import step_args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the step; returns its exit status (0 on success)."""
    # the training folds alone: all that train and fit-head read
    return cli.main(["prepare", "--training", "--targets", "none", *step_args("prepare", argv, __doc__)])


if __name__ == "__main__":
    cli.run(main)  # the status of the step, without the teardown that at times aborted (cli.run)
