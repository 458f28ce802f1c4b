"""Benchmarks of simmim_fast against what users would run instead, with the device's own ceilings
measured in the same run.

    python -m benchmarks.run --suite {kernels,e2e,all} [--smoke] [--ops ...] [--providers ...]
                             [--dtype bf16|fp32] [--flush-l2] [--out DIR] [--compare OLD_DIR]
    bash benchmarks/gpu_check.sh      # tests + benchmarks on a GPU machine in one call (< 9 min)

Method (each point is in the module named):
- ``device``: copy bandwidth (copy_ of 2 GiB) and an 8192^3 bf16 matmul, measured first; the
  datasheet peak matched by device name is reported beside them, and which entry matched.
- ``kernel_cases``: every op at the shapes of ViT-B/16 224 and Swin-B 192 w6 at batch 64, masks
  from MaskGenerator (ratio 0.6); the minimum bytes and FLOPs of each op per autograd pass.
- ``kernels``: forward, backward, forward+backward for eager PyTorch, torch.compile of it
  (compiled before timing), and every simmim_fast backend through the dispatch; a backend that
  reports reasons is recorded as skipped with them, one that raises as an error.
- ``timing``: CUDA events, input sets rotated to exceed the L2, optional L2 flush; kernels are
  timed as GPU time with the host's enqueue time kept apart (a spin kernel holds the GPU while the
  host enqueues), a training step with its host time in. Median and p20/p80.
- ``e2e`` and ``flops``: forward (bf16 autocast) + backward + fused AdamW; images/s and MFU = 3x the
  model's forward matmul FLOPs over time, against the measured matmul rate and the datasheet.
- ``telemetry``: SM clock, power, memory, utilisation from NVML during each training benchmark.
- ``report``: results.json, kernels.csv, e2e.csv, summary.md, PNG plots; ``--compare`` flags
  every measurement more than 5% slower than an earlier run.
CPU runs (and ``--smoke``) time with time.perf_counter and say in their summary that they are not
GPU results; smoke results go to runs/ (ignored by git), never to benchmarks/results/.
"""
