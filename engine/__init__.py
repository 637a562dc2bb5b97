"""geximpute: genotype- and tissue-specific gene expression imputation on Ray."""

__version__ = "0.1.0"

# a Ray worker whose code is not its driver's stops here, naming both (geximpute.code_version)
from geximpute.code_version import check_driver_code as _check_driver_code  # noqa: E402

_check_driver_code()
