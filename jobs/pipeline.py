"""Ray job entry point: the whole batch run, prepare (with training folds), train, fit-head, impute, in order.

Each step is the ``geximpute`` subcommand of the same name, run in this process with the same config and overrides;
the first step that fails stops the pipeline and its exit status is the pipeline's.
"""

from __future__ import annotations

from collections.abc import Sequence

from geximpute.apps import cli
from geximpute.jobs import run_steps, step_args

#: the ``geximpute`` subcommands the pipeline runs, in order
#: (prepare writes the training folds only: train and fit-head read nothing else, and a context record of every
#: measured entry would be the largest output of the run)
STEPS: tuple[tuple[str, ...], ...] = (("prepare", "--training", "--targets", "none"), ("train",), ("fit-head",),
                                      ("impute",))


def main(argv: Sequence[str] | None = None) -> int:
    """Run every step in order; returns 0, or the exit status of the first step that failed."""
    return run_steps("pipeline", STEPS, step_args("pipeline", argv, __doc__))


if __name__ == "__main__":
    cli.run(main)  # the status of the step, without the teardown that at times aborted (cli.run)
