"""The ``testbed`` command: argument parsing and rendering only, one module per command
family (``main`` wires them). The library decides; nothing here branches on a backend.
"""
