"""Host-independent parts of the W2SD extension for AUTOMATIC1111's and Forge's stable-diffusion-webui.

Nothing here imports ``modules.*``: the thin script in ``scripts/w2sd.py`` passes host objects in, and the tests
pass stand-ins that follow the hosts' calling conventions.
"""
