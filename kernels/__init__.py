"""Triton kernels of fdpg, installed as ``fdpg.kernels`` (setup.py maps this folder there).

Importing this package needs triton; :mod:`fdpg.ops` imports it lazily, only when a Triton backend is chosen.
"""
