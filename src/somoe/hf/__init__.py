"""Hugging Face interoperability: ``somoe export`` (to ``transformers``) and ``somoe import-hf`` (from it).

``configuration_somoe.py`` and ``modeling_somoe.py`` are templates copied into remote-code
exports; they import only torch and transformers.
"""
