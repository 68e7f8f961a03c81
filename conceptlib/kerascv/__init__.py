"""The one package that touches keras-cv internals."""
