"""Tests of benchmarks/: the quality benchmark's parts and the GPU benchmark's CPU dry run."""
