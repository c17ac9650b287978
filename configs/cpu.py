r"""A recipe that trains well in about an hour on a 2-core CPU.

  python -m brainseg.main --config configs/cpu.py --workdir /tmp/brainseg/cpu

The seed's network at 128x128 with the three MR sequences, each z-scored per
patient volume; tumour slices oversampled to about half of each epoch;
BCE + soft Dice; AdamW with warm-up and cosine decay; flips, small rotations,
scaling and intensity jitter. Metrics are still computed at 256x256.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.image_size = 128
  config.data.channels = 'mri'
  config.data.normalization = 'volume'
  config.data.tumour_fraction = 0.5

  config.augment.enabled = True
  config.augment.rotate_deg = 10.0
  config.augment.scale = 0.1
  config.augment.intensity = 0.1

  config.loss = 'bce_dice'
  config.optimizer = 'adamw'
  config.learning_rate = 2e-3
  config.weight_decay = 1e-4
  config.schedule = 'cosine'
  config.warmup_steps = 200

  config.num_epochs = 8
  config.eval_every_steps = 250
  config.checkpoint_every_steps = 250
  return config
