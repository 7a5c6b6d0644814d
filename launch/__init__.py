"""How ftpipe's stages are started: the CLI and its executors."""
