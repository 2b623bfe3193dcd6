"""The commands around the pipeline, `python -m commands.<name>` (the Makefile runs each): none is a DVC dep."""
