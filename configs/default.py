r"""The seed project's recipe: 256x256 grayscale, BCE, Adam 1e-4, batch 16, 50 epochs.

  python -m brainseg.main --config configs/default.py --workdir /tmp/brainseg/default \
      --config.data.root=../shared/data/kaggle_3m

Every other config imports this one and changes a few fields. Any field can be
overridden on the command line as --config.a.b=value.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.data = ml_collections.ConfigDict()
  config.data.root = '../shared/data/kaggle_3m'  # A kaggle_3m folder (or the archive above it).
  config.data.split_file = '../shared/data/seed_split.json'  # '' for a random split.
  config.data.split_fractions = (0.8, 0.1, 0.1)  # train/val/test, when split_file is ''.
  config.data.split_seed = 0
  config.data.image_size = 256  # What the model sees; metrics stay at the masks' size.
  config.data.crop_size = 0  # > 0: train on random crops this size of image_size slices.
  config.data.channels = 'gray'  # 'gray' (PIL 'L', as the seed) or 'mri' (the 3 MR sequences).
  config.data.normalization = 'scale'  # 'scale' (/255) or 'volume' (z-score per patient).
  config.data.tumour_fraction = 0.0  # Oversample tumour slices toward this share; 0: natural.
  config.data.num_threads = 2  # grain reader threads (and decoding threads at start-up).
  config.data.prefetch = 4  # Batches prepared ahead of the train step.

  config.augment = ml_collections.ConfigDict()
  config.augment.enabled = False
  config.augment.flip_lr = True
  config.augment.flip_ud = False
  config.augment.rotate_deg = 0.0
  config.augment.scale = 0.0  # Zoom in [1 - scale, 1 + scale].
  config.augment.intensity = 0.0  # Per-channel gain and shift in [-x, x].

  config.model = ml_collections.ConfigDict()
  config.model.features = (16, 32, 64, 128, 256)
  config.model.dtype = 'float32'  # Compute dtype; params and BN statistics stay float32.

  config.loss = 'bce'  # 'bce' or 'bce_dice'.
  config.optimizer = 'adam'  # 'adam', 'adamw' or 'sgd' (momentum 0.9).
  config.learning_rate = 1e-4
  config.weight_decay = 0.0  # adamw only.
  config.schedule = 'constant'  # 'constant' or 'cosine' (with linear warm-up).
  config.warmup_steps = 0

  config.batch_size = 16  # Global, over all devices and hosts.
  config.per_device_batch_size = -1  # > 0: batch_size = this x the device count.
  config.eval_batch_size = 32
  config.num_epochs = 50
  config.num_train_steps = -1  # -1: derived from num_epochs.
  config.log_every_steps = 50
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 1000
  config.checkpoints_to_keep = 2
  config.allow_config_change = False  # Resume a workdir whose config differs.
  config.skip_nonfinite_steps = False  # Skip (and log) NaN/Inf steps instead of stopping.
  config.seed = 0
  # A workdir or best/ folder: start from its best-on-val model (fine-tuning); the
  # optimizer, step count and data order start afresh.
  config.init_from = ''
  return config
