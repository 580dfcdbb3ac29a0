"""asyncio adapters around the sans-I/O core, used by both the exit server and the client.

This sub-package is the only part of ``shared`` that performs I/O; the protocol modules in
``shared/`` proper never import asyncio, websockets or aiohttp (a test checks it).
"""
