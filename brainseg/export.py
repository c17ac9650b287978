r"""Serialises a trained model's inference function with jax.export (StableHLO).

  python -m brainseg.export --checkpoint results/reference --output model.brainseg.zip

The zip holds `model.jaxexport` (the serialised function, weights included) and
`config.json` (what the input must be: size, channels, normalisation). Running
it needs only JAX, no brainseg:

  import json, zipfile, jax
  with zipfile.ZipFile('model.brainseg.zip') as z:
    model = jax.export.deserialize(bytearray(z.read('model.jaxexport')))
    info = json.loads(z.read('config.json'))
  probs = model.call(images)  # images: (N, S, S, C) float32 -> (N, S, S) tumour probability

The function takes any batch size. Preparing `images` (see config.json's
`input`): the slices of one patient, channels as `data.channels` says, z-scored per
channel over the volume's non-zero voxels ('volume') or divided by 255 ('scale'),
then resized to S x S; `brainseg.predict.model_inputs` does exactly that.
"""
import json
import zipfile
from typing import Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from brainseg import checkpointing
from brainseg import cli
from brainseg import input_pipeline
from brainseg import train
from brainseg import writers

FUNCTION_FILE = 'model.jaxexport'
CONFIG_FILE = 'config.json'


def export_model(checkpoint: str, output: str,
                 platforms: Sequence[str] = ('cpu', 'cuda')) -> jax.export.Exported:
  """Writes the zip described above; returns the Exported function."""
  variables, config, step = checkpointing.load_model(checkpoint)
  model = train.create_model(config)
  size, channels = config.data.image_size, input_pipeline.CHANNELS[config.data.channels]

  def probabilities(images):
    return jax.nn.sigmoid(model.apply(variables, images, train=False)[..., 0])

  spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f'b, {size}, {size}, {channels}'),
                              jnp.float32)
  exported = jax.export.export(jax.jit(probabilities), platforms=tuple(platforms))(spec)
  info = {
      'checkpoint': checkpoint, 'step': int(step),
      'input': {'shape': ['batch', size, size, channels], 'dtype': 'float32',
                'channels': config.data.channels,
                'normalization': config.data.normalization},
      'output': {'shape': ['batch', size, size], 'meaning': 'tumour probability; '
                 'threshold at 0.5 after resizing to the slice size'},
      'platforms': list(platforms),
      'config': config.to_dict(),
  }
  with writers.atomic_path(output) as tmp, zipfile.ZipFile(
      tmp, 'w', compression=zipfile.ZIP_DEFLATED) as z:
    z.writestr(FUNCTION_FILE, bytes(exported.serialize()))
    z.writestr(CONFIG_FILE, json.dumps(info, indent=2, default=str))
  return exported


def load_exported(path: str):
  """(Exported, info dict) from a file written by export_model."""
  with zipfile.ZipFile(path) as z:
    return (jax.export.deserialize(bytearray(z.read(FUNCTION_FILE))),
            json.loads(z.read(CONFIG_FILE)))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.setup()
  flags_ = flags.FLAGS
  exported = export_model(flags_.checkpoint, flags_.output, flags_.platforms)
  print(f'Wrote {flags_.output}: inputs {exported.in_avals}, platforms {exported.platforms}')


if __name__ == '__main__':
  flags.DEFINE_string('checkpoint', None, 'A workdir, or a best-checkpoint folder.')
  flags.DEFINE_string('output', None, 'The zip file to write.')
  flags.DEFINE_list('platforms', ['cpu', 'cuda'], 'Platforms to lower for.')
  flags.mark_flags_as_required(['checkpoint', 'output'])
  app.run(lambda argv: cli.run_main(main, argv))
