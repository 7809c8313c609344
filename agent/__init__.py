"""The Modelfleet device agent. Plain Python: it never imports Django."""

__version__ = "0.1.0"
