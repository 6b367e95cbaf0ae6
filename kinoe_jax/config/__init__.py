"""Configuration: gin in and the operative config out, input-path checks for tools, repository paths.
Importing it loads nothing heavy, so a tool can check its command line before TensorFlow and JAX."""
