"""Launchers for multi-host runs (`python tools/launch/tpu_pod.py`, `sbatch tools/launch/slurm_gpu.sbatch`)."""
