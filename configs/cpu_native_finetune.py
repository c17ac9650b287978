r"""Fine-tunes a configs/cpu_native.py model on whole 256x256 slices.

  python -m brainseg.main --config configs/cpu_native_finetune.py \
      --workdir /tmp/brainseg/cpu_native_finetune \
      --config.init_from=/tmp/brainseg/cpu_native

cpu_native trains on 128x128 crops, and every crop of a tumour slice holds tumour,
so the network meets far more tumour per pixel, and less of the slice around it,
than it does on whole slices. A few hundred steps on whole slices, from its
best-on-val model with a small learning rate, show it the slices it is run on.
About 35 min on a 2-core CPU (a whole-slice step costs about 4x a crop step).
"""
from configs import cpu_native


def get_config():
  config = cpu_native.get_config()
  config.data.crop_size = 0
  config.init_from = '/tmp/brainseg/cpu_native'  # The cpu_native run's workdir.
  config.num_train_steps = 300
  config.learning_rate = 2e-4
  config.warmup_steps = 20
  config.eval_every_steps = 50
  config.checkpoint_every_steps = 50
  return config
