"""Generated from protos/switchyard/v1 by scripts/gen_protos.py; never edit by hand."""
