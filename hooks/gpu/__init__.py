"""GPU driver access for hookd: CUDA checkpoint calls, NVML inventory, /proc reads, the blocking-call executor."""
