"""Deep metric learning example trainer built on the public nir_loss API."""
