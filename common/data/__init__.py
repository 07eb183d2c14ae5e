"""Data layer: synthetic phantoms (``synthetic``), datalists (``datalist``), input checks (``validate``), real-data
preparers (``prepare``; CLI ``python -m common.data``), registration pairs (``pairs``) and atlas choice (``atlas``).

Submodules are imported explicitly (``import common.data.synthetic``) so that importing the package stays cheap.
"""
