"""Tests of the documentation: the README and the site say what the code does."""
