"""The CUB trainer's package (examples/cub/train.py), built on the public nir_loss API."""
