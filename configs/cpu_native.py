r"""The reference recipe: configs/cpu.py at the masks' native resolution, 16 epochs.

  python -m brainseg.main --config configs/cpu_native.py --workdir /tmp/brainseg/cpu_native

The network trains on 128x128 crops of the 256x256 slices (each tumour slice's crop
holds tumour), so a step costs what a 128x128 step costs, and it is validated,
evaluated and run on whole 256x256 slices. About 1 h 45 min on a 2-core CPU.
results/reference was trained with this recipe (written there as configs/cpu.py with
the same fields overridden on the command line).
"""
from configs import cpu


def get_config():
  config = cpu.get_config()
  config.data.image_size = 256
  config.data.crop_size = 128
  config.num_epochs = 16
  return config
