"""Tests of examples/: the demo, the PML-style script, the custom proxy loss and the CUB trainer."""
