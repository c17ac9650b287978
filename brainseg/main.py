r"""Trains the Attention U-Net: the command line of `train.train_and_evaluate`.

  python -m brainseg.main --config configs/cpu.py --workdir /tmp/brainseg/cpu \
      [--config.data.root=../shared/data/kaggle_3m] [--config.num_epochs=20]

Running the same command again in the same workdir resumes from its latest
checkpoint. Watch the run with `tensorboard --logdir WORKDIR`.
"""
from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from brainseg import cli
from brainseg import train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Folder for checkpoints, logs and TensorBoard events.')
config_flags.DEFINE_config_file('config', None, 'A configs/*.py file.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.setup(train.sharded_batch_sizes(FLAGS.config))
  logging.info('JAX %s on %s; %d process(es), %d local device(s)', jax.__version__,
               jax.default_backend(), jax.process_count(), jax.local_device_count())
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  jax.config.config_with_absl()
  app.run(lambda argv: cli.run_main(main, argv))
