"""geximpute: genotype- and tissue-specific gene expression imputation on Ray."""

__version__ = "0.1.0"
