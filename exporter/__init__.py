"""Batch export and the `dff` command line: discover, explain."""
