"""Readers for every input, each validating as it reads and returning columnar data (see :mod:`geximpute.schema`)."""
