"""The test suite: one test_<module>.py per module of nir_loss/ (test_package.py: its top level);
examples/, docs/ and benchmarks/ hold the tests of those folders of the repository."""
