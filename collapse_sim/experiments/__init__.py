"""Experiments: they measure and return data (dataclasses, tables, CSV rows); the report
(:mod:`collapse_sim.report`) and the command line turn that data into words and figures."""
