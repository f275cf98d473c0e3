"""The grass-index command line (installed as grass_index.cli)."""
