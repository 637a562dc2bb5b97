"""Ray job entry point: the model, built in order: prepare (training folds only), train, fit-head.

The training half of ``pipeline`` (:mod:`geximpute.jobs.pipeline`), for a cluster that builds the model once and
imputes in other jobs (``cluster/kuberay/rayjob-train.yaml``). One entry point, not three joined by ``&&``: a KubeRay
submitter pastes the entrypoint into its own shell line, which would run only the first command as the Ray job and
the others in the submitter's pod.
"""

from __future__ import annotations

from collections.abc import Sequence

from geximpute.apps import cli
from geximpute.jobs import run_steps, step_args
from geximpute.jobs.pipeline import STEPS

#: the steps that build the model: the pipeline's, less the imputation
BUILD_STEPS = tuple(step for step in STEPS if step[0] != "impute")


def main(argv: Sequence[str] | None = None) -> int:
    """Run every step in order; returns 0, or the exit status of the first step that failed."""
    return run_steps("build", BUILD_STEPS, step_args("build", argv, __doc__))


if __name__ == "__main__":
    cli.run(main)  # the status of the step, without the teardown that at times aborted (cli.run)
