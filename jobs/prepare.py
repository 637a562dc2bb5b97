"""Ray job entry point: the promoter and context records with the labelled training folds (`geximpute prepare
--training`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from geximpute.apps import cli
from geximpute.jobs import step_args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the step; returns its exit status (0 on success)."""
    return cli.main(["prepare", "--training", *step_args("prepare", argv, __doc__)])


if __name__ == "__main__":
    sys.exit(main())
