"""ftpipe's stages and what they share: config, run directory, tracking."""

__version__ = "0.1.0"
