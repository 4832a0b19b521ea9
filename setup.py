"""Shim for Beam's --setup_file: remote workers (Dataflow, Flink, Spark) build and install
this package from it. All metadata lives in pyproject.toml."""

from setuptools import setup

setup()
