r"""One host with several GPUs (e.g. 8x A100/H100): the CPU recipe at full size, in bf16.

  launch/gpu_node.sh configs/gpu.py /tmp/brainseg/gpu

The network sees 256x256 (no downsampling: GPUs have the FLOPs). Global batch
= 16 per device x the device count (128 on 8 GPUs); the learning rate is scaled linearly from
the CPU recipe's 2e-3 at batch 16 (Goyal et al. 2017), capped at 4e-3 because
Adam-type optimizers tolerate less than linear scaling at 8x, with a longer
warm-up to match.
"""
from configs import cpu


def get_config():
  config = cpu.get_config()
  config.data.image_size = 256
  config.data.num_threads = 8
  config.data.prefetch = 8
  config.model.dtype = 'bfloat16'
  config.per_device_batch_size = 16  # Global batch 128 on 8 GPUs.
  config.eval_batch_size = 128
  config.learning_rate = 4e-3
  config.warmup_steps = 500
  config.num_epochs = 100
  config.log_every_steps = 20
  config.eval_every_steps = 200
  config.checkpoint_every_steps = 200
  return config
