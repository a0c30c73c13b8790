"""HTTP handlers, one module per endpoint family. Each handler: validate, run, encode."""
