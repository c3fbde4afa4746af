"""Samplers: the shell's eyes on the host (psutil, NVML). Host facts in, Resources and samples out."""
