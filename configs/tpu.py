r"""A Cloud TPU slice (e.g. v5e-16: 4 hosts x 4 chips), bf16 at 256x256.

  launch/tpu_vm.sh NAME ZONE configs/tpu.py /mnt/shared/brainseg/tpu

Global batch 256 = 16 per chip x 16 chips (per_device_batch_size, from gpu.py). The learning rate is the GPU
recipe's 4e-3 (batch 128) scaled by sqrt(2) for the doubled batch, the usual
rule for Adam-type optimizers, with a longer warm-up.
"""
from configs import gpu


def get_config():
  config = gpu.get_config()
  config.eval_batch_size = 256
  config.learning_rate = 5.6e-3
  config.warmup_steps = 800
  config.data.num_threads = 16
  return config
