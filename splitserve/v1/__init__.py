"""Stubs generated from proto/splitserve/v1 by proto/generate.py; do not edit them by hand."""
