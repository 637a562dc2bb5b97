"""Ray job entry point: fit the XGBoost head and write the model bundle (`geximpute fit-head`)."""

from __future__ import annotations

from collections.abc import Sequence

from geximpute.apps import cli
from geximpute.jobs import step_args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the step; returns its exit status (0 on success)."""
    return cli.main(["fit-head", *step_args("fit_head", argv, __doc__)])


if __name__ == "__main__":
    cli.run(main)  # the status of the step, without the teardown that at times aborted (cli.run)
