"""Ray job entry point: the whole batch run, prepare (with training folds), train, fit-head, impute, in order.

Each step is the ``geximpute`` subcommand of the same name, run in this process with the same config and overrides;
the first step that fails stops the pipeline and its exit status is the pipeline's.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from geximpute.apps import cli
from geximpute.jobs import step_args

#: the ``geximpute`` subcommands the pipeline runs, in order
#: (prepare writes the training folds only: train and fit-head read nothing else, and a context record of every
#: measured entry would be the largest output of the run)
STEPS: tuple[tuple[str, ...], ...] = (("prepare", "--training", "--targets", "none"), ("train",), ("fit-head",),
                                      ("impute",))


def main(argv: Sequence[str] | None = None) -> int:
    """Run every step in order; returns 0, or the exit status of the first step that failed."""
    forwarded = step_args("pipeline", argv, __doc__)
    for step in STEPS:
        print(f"pipeline: geximpute {' '.join(step)}", flush=True)
        status = cli.main([*step, *forwarded])
        if status != 0:
            print(f"pipeline: `geximpute {step[0]}` failed with exit status {status}; later steps not run",
                  file=sys.stderr, flush=True)
            return status
    print("pipeline: all steps succeeded", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
