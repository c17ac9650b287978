r"""A tiny model on tiny images, for tests: a few steps compile and run in seconds.

  python -m brainseg.main --config configs/tiny.py --workdir /tmp/brainseg/tiny \
      --config.data.root=DIR --config.data.split_file=''
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.image_size = 32
  config.data.channels = 'mri'
  config.data.normalization = 'volume'
  config.data.split_file = ''
  config.data.split_fractions = (0.5, 0.25, 0.25)
  config.data.tumour_fraction = 0.5
  config.augment.enabled = True
  config.augment.rotate_deg = 10.0
  config.augment.scale = 0.1
  config.augment.intensity = 0.1
  config.model.features = (4, 8, 16)
  config.loss = 'bce_dice'
  config.learning_rate = 1e-3
  config.batch_size = 4
  config.eval_batch_size = 4
  config.num_train_steps = 2
  config.log_every_steps = 1
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 1
  return config
