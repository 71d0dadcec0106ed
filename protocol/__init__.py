"""The jetfleet wire contract: topics, messages, the bundle manifest, signing and trust.

Pure: no network, no global state. Runs on Python 3.10 (JetPack 6). Imports neither
`agent` nor `controller`.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
