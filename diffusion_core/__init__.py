"""The maths and the model of a DDPM-family denoiser: schedules, network, losses, samplers.

Imports torch, numpy and the standard library only (no Prefect, no Ray), never prints and does no
I/O at import time.
"""
