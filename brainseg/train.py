"""Training and periodic validation of the Attention U-Net.

`train_and_evaluate(config, workdir)` is the whole job: it reads the data,
builds a jitted train step over a mesh of every device, trains, validates,
checkpoints (resuming from the latest checkpoint in `workdir`) and returns the
final state. `main.py` is only its command line.
"""
import functools
import os
import signal
import time
from typing import Any, Callable, Dict, Optional, Sequence, Set, Tuple

from absl import logging
from clu import metrics as clu_metrics
import flax
from flax import traverse_util
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from brainseg import checkpointing
from brainseg import data as data_lib
from brainseg import input_pipeline
from brainseg import losses
from brainseg import metrics as metrics_lib
from brainseg import models
from brainseg import parallel
from brainseg import visualize
from brainseg import writers


class TrainState(train_state.TrainState):
  """Params and optimizer state, plus BatchNorm's running statistics and how many
  non-finite steps were skipped (in the state so that the count survives a resume)."""
  batch_stats: Any
  skipped_steps: jax.Array = flax.struct.field(default_factory=lambda: jnp.zeros((), jnp.int32))


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output('loss')
  grad_norm: clu_metrics.Average.from_output('grad_norm')


# ---------------------------------------------------------------------------
# Model, optimizer and state.
# ---------------------------------------------------------------------------


def create_model(config: ml_collections.ConfigDict) -> models.AttentionUNet:
  return models.AttentionUNet(features=tuple(config.model.features),
                              dtype=jnp.dtype(config.model.dtype))


def input_shape(config: ml_collections.ConfigDict, training: bool = False) -> Tuple[int, int, int]:
  """One slice as the model sees it: a crop in training when data.crop_size is set."""
  size = config.data.image_size
  if training and config.data.get('crop_size', 0):
    size = config.data.crop_size
  return (size, size, input_pipeline.CHANNELS[config.data.channels])


def make_lr_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Constant, or linear warm-up then cosine decay to zero over the run."""
  if config.schedule == 'constant':
    return optax.constant_schedule(config.learning_rate)
  if config.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, min(config.warmup_steps, total_steps - 1),
        max(total_steps, 1), end_value=0.0)
  raise ValueError(f"config schedule must be 'constant' or 'cosine', got {config.schedule!r}")


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int):
  schedule = make_lr_schedule(config, total_steps)
  if config.optimizer == 'adam':
    return optax.adam(schedule)
  if config.optimizer == 'adamw':
    return optax.adamw(schedule, weight_decay=config.weight_decay)
  if config.optimizer == 'sgd':
    return optax.sgd(schedule, momentum=0.9)
  raise ValueError(f"config optimizer must be 'adam', 'adamw' or 'sgd', got {config.optimizer!r}")


def check_variables_match(variables: Dict[str, Any], config: ml_collections.ConfigDict,
                          source: str) -> None:
  """Raises ValueError if the checkpoint's arrays do not fit the config's model."""
  model = create_model(config)
  expected = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, *input_shape(config)))))
  shapes = lambda tree: {jax.tree_util.keystr(k): tuple(v.shape)
                         for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  got, want = shapes(variables), shapes(expected)
  if got != want:
    diff = sorted(set(got.items()) ^ set(want.items()))[:4]
    raise ValueError(f'checkpoint {source} does not fit the config (model.features='
                     f'{tuple(config.model.features)}, data.channels={config.data.channels!r}); '
                     f'first differences (name, shape): {diff}')


def load_init_variables(config: ml_collections.ConfigDict) -> Optional[Dict[str, Any]]:
  """The model `config.init_from` names (params and BatchNorm statistics); None if unset.

  Fine-tuning starts from another run's best-on-val model with a fresh optimizer,
  step count and data order; the model and its inputs must be the same.

  Raises:
    ValueError: naming init_from and what does not fit, before any data is read.
  """
  if not config.init_from:
    return None
  try:
    variables, saved, step = checkpointing.load_model(config.init_from)
  except FileNotFoundError as e:
    raise ValueError(f'config init_from={config.init_from!r}: {e}') from e
  for field in ('channels', 'normalization'):
    if saved.data[field] != config.data[field]:
      raise ValueError(f'config init_from={config.init_from!r} was trained with '
                       f'data.{field}={saved.data[field]!r}, this config has '
                       f'{config.data[field]!r}')
  check_variables_match(variables, config, f'init_from={config.init_from!r} step {step}')
  logging.info('Starting from the model in %s (step %d)', config.init_from, step)
  return variables


def training_patients(path: str, patients: Sequence[str], saved_config=None,
                      _seen: Sequence[str] = ()) -> Set[str]:
  """Every patient the model saved under `path` (a workdir or `best/` folder) learned from.

  Runs record the list with their best-on-val model. For runs saved before that
  it is recomputed from the saved config (`saved_config`, else the best model's):
  its own train split over `patients` (a data root's ids) and, through
  `init_from`, its start model's, and so on back.

  Raises:
    ValueError: when it cannot be told (no list, and the saved split file cannot
      be read from here).
  """
  recorded = checkpointing.load_trained_on(path)
  if recorded is not None:
    return set(recorded)
  unknown = (f'cannot tell which patients {path} trained on (to refuse scoring it on '
             'them): it records no list, being saved before brainseg recorded one, and ')
  try:
    config = (saved_config if saved_config is not None
              else checkpointing.load_saved_config(path))
  except FileNotFoundError:
    raise ValueError(unknown + 'it holds no best-on-val checkpoint with its config') from None
  d = config['data']
  try:
    learned = set(data_lib.make_split(list(patients), d['split_file'],
                                      tuple(d['split_fractions']), d['split_seed'])['train'])
  except (data_lib.DataError, OSError):
    raise ValueError(unknown + f'its saved split file {d["split_file"]!r} cannot be read from '
                     'here; run from the directory it was trained in') from None
  source = config.get('init_from')
  seen = {os.path.abspath(p) for p in (*_seen, path)}
  if source and os.path.abspath(source) not in seen:
    learned |= training_patients(source, patients, _seen=tuple(seen))
  return learned


def check_init_from_unseen(config: ml_collections.ConfigDict, patients: Sequence[str]) -> Set[str]:
  """Refuses a fine-tune whose val or test split holds a patient its start model
  learned from (its best-on-val choice and test score would be optimistic).

  Returns:
    the start model's training patients.
  """
  split = data_lib.make_split(list(patients), config.data.split_file,
                              config.data.split_fractions, config.data.split_seed)
  learned = training_patients(config.init_from, patients)
  for part in ('val', 'test'):
    leaked = sorted(learned & set(split[part]))
    if leaked:
      raise ValueError(f'config init_from={config.init_from!r} was trained on {len(leaked)} '
                       f'patient(s) of this run\'s {part} split (e.g. {leaked[:3]}); fine-tune '
                       'on the split that model was trained with (data.split_file, '
                       'data.split_seed)')
  return learned


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array,
                       total_steps: int) -> TrainState:
  """A fresh state: initialised params, BatchNorm statistics and optimizer."""
  model = create_model(config)
  variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, *input_shape(config)))))(rng)
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           batch_stats=variables['batch_stats'],
                           tx=make_optimizer(config, total_steps))


# ---------------------------------------------------------------------------
# The steps.
# ---------------------------------------------------------------------------


def train_step(state: TrainState, batch: Dict[str, jax.Array], rng: jax.Array,
               loss_name: str, skip_nonfinite: bool = False):
  """One optimizer step on a global batch; BatchNorm uses the global batch's statistics.

  Returns:
    (new state, TrainMetrics, finite): `finite` is False when the loss or the
    gradients hold NaN or Inf. With `skip_nonfinite` such a step leaves params,
    optimizer state and BatchNorm statistics as they were (only the step count
    moves on, so data and randomness stay aligned with an unskipped run).
  """
  step_rng = jax.random.fold_in(rng, state.step)  # Same numbers after a resume.

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
        mutable=['batch_stats'], rngs={'dropout': step_rng})
    return losses.segmentation_loss(loss_name, logits, batch['mask']), updates

  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = state.apply_gradients(grads=grads, batch_stats=updates['batch_stats'])
  if skip_nonfinite:
    unchanged = state.replace(step=new_state.step,
                              skipped_steps=state.skipped_steps + 1)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, unchanged)
    loss, grad_norm = jnp.where(finite, loss, 0.0), jnp.where(finite, grad_norm, 0.0)
  metrics = TrainMetrics.single_from_model_output(loss=loss, grad_norm=grad_norm)
  return new_state, metrics, finite


def model_variables(state: TrainState) -> Dict[str, Any]:
  """What `model.apply` needs for inference."""
  return {'params': state.params, 'batch_stats': state.batch_stats}


def predict_probs(variables, images: jax.Array, native_hw: Tuple[int, int], apply_fn,
                  tta_flips: bool = False):
  """Tumour probabilities (N, H, W) at the masks' native size.

  The model runs at the images' size; its probabilities (not its logits) are
  resized back before anyone thresholds them. `tta_flips` averages them with
  those of the left-right mirrored images (mirrored back).
  """
  probs = jax.nn.sigmoid(apply_fn(variables, images, train=False)[..., 0])
  if tta_flips:
    mirrored = jax.nn.sigmoid(apply_fn(variables, images[:, :, ::-1], train=False)[..., 0])
    probs = 0.5 * (probs + mirrored[:, :, ::-1])
  if probs.shape[1:] != tuple(native_hw):
    probs = jax.image.resize(probs, (probs.shape[0], *native_hw), 'linear')
  return probs


def eval_step(variables, batch: Dict[str, jax.Array], apply_fn):
  """Per-slice (intersection, predicted, true) counts at native resolution."""
  probs = predict_probs(variables, batch['image'], batch['native_mask'].shape[1:], apply_fn)
  return metrics_lib.slice_counts(probs, batch['native_mask'])


def compile_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """The jitted train step: batch sharded on `data`, state replicated and donated."""
  replicated = parallel.replicated(mesh)
  step = functools.partial(train_step, loss_name=config.loss,
                           skip_nonfinite=config.skip_nonfinite_steps)
  return jax.jit(step, in_shardings=(replicated, parallel.batch_sharding(mesh), replicated),
                 out_shardings=(replicated, replicated, replicated), donate_argnums=0)


def compile_eval_step(model: models.AttentionUNet, mesh: jax.sharding.Mesh):
  """The jitted eval step: `eval_step(variables, batch)`, batch sharded on `data`."""
  return jax.jit(functools.partial(eval_step, apply_fn=model.apply),
                 in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                 out_shardings=parallel.batch_sharding(mesh))


def _over_split(jit_fn, variables, arrays: input_pipeline.SliceArrays, batch_size: int,
                mesh: jax.sharding.Mesh):
  """Yields (rows, outputs) of `jit_fn(variables, batch)` over every slice once.

  Padding rows are dropped; `outputs` are host arrays whose first axis matches `rows`.
  """
  local_batch = batch_size // jax.process_count()
  for batch in input_pipeline.eval_batches(arrays, local_batch, jax.process_index(),
                                           jax.process_count()):
    index = parallel.gather_to_host(parallel.to_global(
        {'index': batch.pop('index')}, mesh))['index']
    batch.pop('valid')
    out = parallel.gather_to_host(jit_fn(variables, parallel.to_global(batch, mesh)))
    keep = index >= 0
    yield index[keep], jax.tree_util.tree_map(lambda x: np.asarray(x)[keep], out)


def evaluate_counts(jit_eval, variables, arrays: input_pipeline.SliceArrays,
                    batch_size: int, mesh: jax.sharding.Mesh) -> Dict[str, np.ndarray]:
  """Runs every slice of `arrays` once; per-slice counts in the arrays' row order."""
  counts = np.zeros((3, len(arrays)), np.int64)
  for rows, out in _over_split(jit_eval, variables, arrays, batch_size, mesh):
    counts[:, rows] = np.stack(out)
  return {'intersection': counts[0], 'predicted': counts[1], 'true': counts[2]}


def split_probs(model: models.AttentionUNet, variables, arrays: input_pipeline.SliceArrays,
                batch_size: int, mesh: jax.sharding.Mesh, tta_flips: bool = False) -> np.ndarray:
  """(N, H, W) float32 probabilities at the masks' size, in the arrays' row order."""
  native_hw = arrays.native_masks.shape[1:]
  jit_probs = jax.jit(
      lambda v, batch: predict_probs(v, batch['image'], native_hw, model.apply, tta_flips),
      in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
      out_shardings=parallel.batch_sharding(mesh))
  probs = np.zeros((len(arrays), *native_hw), np.float32)
  for rows, out in _over_split(jit_probs, variables, arrays, batch_size, mesh):
    probs[rows] = out
  return probs


# ---------------------------------------------------------------------------
# Set-up helpers.
# ---------------------------------------------------------------------------


def sharded_batch_sizes(config: ml_collections.ConfigDict) -> Tuple[int, ...]:
  """The batch sizes the device count must divide (see `cli.default_cpu_devices`):
  a per-device batch grows with the count, so only the eval batch is fixed."""
  if config.per_device_batch_size > 0:
    return (config.eval_batch_size,)
  return (config.batch_size, config.eval_batch_size)


def resolve_batch_size(config: ml_collections.ConfigDict) -> None:
  """Sets the global batch_size from per_device_batch_size when that is given (> 0)."""
  if config.per_device_batch_size > 0:
    config.batch_size = config.per_device_batch_size * jax.device_count()
    config.eval_batch_size = max(config.eval_batch_size, config.batch_size)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Rejects a bad setting by name before any data is read."""
  n_dev, n_proc = jax.device_count(), jax.process_count()
  hint = '; on a CPU, JAX_NUM_CPU_DEVICES=N sets it' if jax.default_backend() == 'cpu' else ''
  if config.batch_size <= 0 or config.batch_size % n_dev:
    raise ValueError(f'config batch_size={config.batch_size} must be a positive multiple '
                     f'of the device count ({n_dev}{hint})')
  if config.eval_batch_size <= 0 or config.eval_batch_size % n_dev:
    raise ValueError(f'config eval_batch_size={config.eval_batch_size} must be a positive '
                     f'multiple of the device count ({n_dev}{hint})')
  depth = max(len(config.model.features), 1)
  for name in ('image_size', 'crop_size'):
    if config.data[name] % (2 ** (depth - 1)):
      raise ValueError(f'config data.{name}={config.data[name]} must be divisible by '
                       f'2**(depth-1)={2 ** (depth - 1)} for {depth} levels of model.features')
  if not 0 <= config.data.crop_size <= config.data.image_size:
    raise ValueError(f'config data.crop_size={config.data.crop_size} must be 0 (no crop) or at '
                     f'most data.image_size={config.data.image_size}')
  if config.augment.enabled and not 0 <= config.augment.scale < 1:
    raise ValueError(f'config augment.scale must be in [0, 1), got {config.augment.scale}')
  for name, value, allowed in (('data.channels', config.data.channels, input_pipeline.CHANNELS),
                               ('data.normalization', config.data.normalization,
                                input_pipeline.NORMALIZATIONS),
                               ('loss', config.loss, losses.LOSSES),
                               ('optimizer', config.optimizer, ('adam', 'adamw', 'sgd')),
                               ('schedule', config.schedule, ('constant', 'cosine'))):
    if value not in allowed:
      raise ValueError(f'config {name} must be one of {sorted(allowed)}, got {value!r}')
  for name in ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
               'data.num_threads', 'data.prefetch'):
    value = config.data[name[5:]] if name.startswith('data.') else config[name]
    if value <= 0:
      raise ValueError(f'config {name} must be positive, got {value}')
  if not 0 <= config.data.tumour_fraction < 1:
    raise ValueError(f'config data.tumour_fraction must be in [0, 1), got '
                     f'{config.data.tumour_fraction}')
  if not config.model.features or min(config.model.features) < 2:
    raise ValueError(f'config model.features must be a non-empty list of widths >= 2, got '
                     f'{tuple(config.model.features)}')
  if config.batch_size % n_proc:
    raise ValueError(f'config batch_size={config.batch_size} must divide by the process '
                     f'count ({n_proc})')


def prepare_workdir(workdir: str) -> None:
  """Creates the workdir and checks it takes files, before any work is done."""
  probe = os.path.join(workdir, f'.write_test_{jax.process_index()}')
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, 'w'):
      pass
    os.remove(probe)
  except OSError as e:
    raise ValueError(f'workdir {workdir} is not writable: {e}') from e


def load_splits(config: ml_collections.ConfigDict, parts=data_lib.SPLITS,
                patients: Optional[Dict[str, data_lib.Patient]] = None):
  """Splits the data root by patient and loads the asked-for parts.

  `patients` is the root's `data.scan`, when the caller has it already
  (scanning reads every TIFF header).
  """
  if patients is None:
    patients = data_lib.scan(config.data.root)
  split = data_lib.make_split(list(patients), config.data.split_file,
                              config.data.split_fractions, config.data.split_seed)
  arrays = {}
  for part in parts:
    if not split[part]:
      raise data_lib.DataError(f'the {part} split holds no patients')
    arrays[part] = input_pipeline.load_arrays(
        [patients[p] for p in split[part]], config.data.image_size, config.data.channels,
        config.data.normalization, config.data.num_threads)
  return split, arrays


def total_train_steps(config: ml_collections.ConfigDict, train_arrays) -> int:
  if config.num_train_steps > 0:
    return config.num_train_steps
  slices = input_pipeline.epoch_length(train_arrays, config.data.tumour_fraction)
  return max(1, int(config.num_epochs * slices // config.batch_size))


class _Preemption:
  """Turns SIGTERM into a flag the loop polls, so it can save and exit cleanly."""

  def __init__(self, requested_before: Callable[[], bool] = lambda: False):
    self._requested = requested_before()
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self._requested = True
    if callable(self._previous):  # A caller's own handler (brainseg.cv's) hears it too.
      self._previous(signum, frame)

  def should_stop(self) -> bool:
    """Whether any process was told to stop; every process gets the same answer.

    Called once per step by every process (a collective when there are several),
    so all of them save the same step and leave the loop together.
    """
    return parallel.any_process(self._requested)

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s'


# ---------------------------------------------------------------------------
# The job.
# ---------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_requested: Callable[[], bool] = lambda: False) -> TrainState:
  """Trains with periodic validation and checkpoints; resumes from `workdir`.

  `stop_requested` tells whether a caller's own SIGTERM handler was called while
  this function was setting up (brainseg.cv): the loop then saves after one step and stops.

  Returns:
    the final train state.
  """
  resolve_batch_size(config)
  validate_config(config)
  if config.init_from:  # Recorded absolute: a resume, or evaluate, may run from elsewhere.
    config.init_from = os.path.abspath(config.init_from)
  prepare_workdir(workdir)
  checkpointing.check_workdir_config(workdir, config)
  # A resumed run starts from its own checkpoint, so its init_from may be gone by now.
  resuming = checkpointing.latest_train_step(workdir) is not None
  init_variables = None if resuming else load_init_variables(config)
  mesh = parallel.create_mesh()
  logging.info('Mesh: %s over %d device(s), %d process(es)', dict(mesh.shape),
               jax.device_count(), jax.process_count())

  # ----- Data -----
  patients = data_lib.scan(config.data.root)
  inherited = set()  # The start model's training patients (init_from).
  if init_variables is not None:
    inherited = check_init_from_unseen(config, sorted(patients))
  split, arrays = load_splits(config, parts=('train', 'val'), patients=patients)
  train_arrays, val_arrays = arrays['train'], arrays['val']
  num_steps = total_train_steps(config, train_arrays)
  logging.info('Data: %d train slices (%d patients), %d val slices (%d patients); '
               '%d steps of %d', len(train_arrays), len(split['train']), len(val_arrays),
               len(split['val']), num_steps, config.batch_size)
  local_batch = config.batch_size // jax.process_count()
  train_iter = iter(input_pipeline.train_dataset(train_arrays, config, local_batch,
                                                 jax.process_index(), jax.process_count()))

  # ----- State: fresh or init_from's model, or restored if the workdir has a checkpoint -----
  rng = jax.random.PRNGKey(config.seed)
  init_rng, step_rng = jax.random.split(rng)
  state = create_train_state(config, init_rng, num_steps)
  if init_variables is not None:
    state = state.replace(params=init_variables['params'],
                          batch_stats=init_variables['batch_stats'])
  state = jax.device_put(state, parallel.replicated(mesh))
  manager = checkpointing.train_manager(workdir, config)
  best = checkpointing.BestCheckpoint(workdir)
  # Recorded in the workdir at every start and with every best model, for
  # evaluate's leakage check. A resume adds to the first start's record, which
  # holds a fine-tune's start-model patients even once that model is gone.
  if resuming and config.init_from:
    if os.path.isdir(config.init_from):
      inherited = training_patients(config.init_from, sorted(patients))
    elif checkpointing.load_trained_on(workdir) is None:
      logging.warning('init_from=%s is gone and this run (started before brainseg recorded '
                      'training patients) has no record of them: its leakage check will know '
                      'only its own train split.', config.init_from)
  trained_on = checkpointing.record_trained_on(workdir, set(split['train']) | inherited)
  state = checkpointing.restore_latest(manager, state, train_iter)
  start_step = int(state.step)
  if start_step:
    logging.info('Resumed from step %d (best val Dice so far: %s)', start_step,
                 f'{best.value:.4f}' if best.value >= 0 else 'none yet')
  if start_step >= num_steps:
    logging.info('The run in %s is already complete (%d steps); nothing to train.', workdir,
                 num_steps)

  jit_train = compile_train_step(config, mesh)
  jit_eval = compile_eval_step(create_model(config), mesh)
  writer = writers.MetricLogger(workdir, jax.process_index(), resume_step=start_step)
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
  if start_step == 0:
    writer.write_hparams(config.to_dict())
  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                           every_steps=config.log_every_steps, every_secs=None)
  preemption = _Preemption(stop_requested)
  schedule = make_lr_schedule(config, num_steps)

  shown_rows = visualize.display_rows(val_arrays)  # The same val slices at every eval.
  jit_attention = visualize.forward_with_attention(state.apply_fn)

  # ----- Loop -----
  train_metrics, unchecked = None, []  # unchecked: (step, finite flag) since the last sync.
  window_start, window_step = time.time(), start_step
  try:
    for step in range(start_step + 1, num_steps + 1):
      with report.timed('data', wait_jax_async_dispatch=False):
        batch = parallel.to_global(next(train_iter), mesh)
      state, step_metrics, finite = jit_train(state, batch, step_rng)
      train_metrics = step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
      unchecked.append((step, finite))
      report(step)
      is_last = step == num_steps
      stop = preemption.should_stop()
      do_eval = step % config.eval_every_steps == 0 or is_last
      do_save = step % config.checkpoint_every_steps == 0 or is_last or stop
      if step % config.log_every_steps == 0 or do_eval or do_save:
        # Checked before anything is evaluated or saved: a NaN state is never kept.
        _check_finite(unchecked, config.skip_nonfinite_steps, manager, workdir)
        unchecked = []
      if step % config.log_every_steps == 0 or do_eval:
        rate = (step - window_step) / max(time.time() - window_start, 1e-9)
        _log_train(writer, step, num_steps, train_metrics.compute(), rate, config,
                   float(schedule(step - 1)), int(state.skipped_steps))
        train_metrics, window_start, window_step = None, time.time(), step
      if do_eval:
        with report.timed('eval'):
          val = metrics_lib.summarize(val_arrays.patient_ids, **evaluate_counts(
              jit_eval, model_variables(state), val_arrays, config.eval_batch_size, mesh))
        writer.write_scalars(step, {f'val/{k}': v for k, v in _flatten(val).items()})
        logging.info('step %d  val per-slice Dice %.4f  per-patient Dice %.4f', step,
                     val['per_slice']['dice'], val['per_patient']['dice_mean'])
        writer.write_images(step, {f'val/{k}': v for k, v in visualize.tensorboard_images(
            jit_attention, model_variables(state), val_arrays.images[shown_rows],
            val_arrays.masks[shown_rows]).items()})
        if best.update(step, model_variables(state), val['per_slice']['dice'], config,
                       trained_on):
          logging.info('New best val per-slice Dice %.4f at step %d', best.value, step)
        writer.flush()
      if do_save:
        with report.timed('checkpoint'):
          checkpointing.save(manager, step, state, train_iter, force=stop)
      if stop:
        manager.wait_until_finished()
        logging.warning('SIGTERM received: saved step %d in %s and stopping; run the '
                        'same command to resume.', step, workdir)
        break
  finally:
    preemption.restore()
    manager.wait_until_finished()
    manager.close()
    best.close()
    writer.close()
  return state


def _check_finite(unchecked, skip: bool, manager, workdir: str) -> None:
  """Raises on the first non-finite step, or logs each one when skipping them."""
  bad = [step for step, finite in unchecked if not bool(finite)]
  if bad and not skip:
    manager.wait_until_finished()
    raise FloatingPointError(
        f'non-finite loss or gradients at step {bad[0]}; training stopped. The last good '
        f'checkpoint (step {manager.latest_step()}) is kept in {checkpointing.train_dir(workdir)}. '
        'Set --config.skip_nonfinite_steps=True to skip such steps instead.')
  for step in bad:
    logging.warning('step %d: non-finite loss or gradients; update skipped', step)


def _log_train(writer, step: int, num_steps: int, summary, rate: float,
               config: ml_collections.ConfigDict, learning_rate: float, skipped: int):
  """Writes the training scalars and prints the progress line."""
  loss = float(summary['loss'])
  writer.write_scalars(step, {'loss': loss, 'grad_norm': float(summary['grad_norm']),
                              'learning_rate': learning_rate,
                              'images_per_sec': rate * config.batch_size,
                              'skipped_steps': skipped})
  logging.info('step %d/%d  loss %.4f  %.2f steps/s  %.1f img/s  ETA %s', step, num_steps,
               loss, rate, rate * config.batch_size,
               _format_eta((num_steps - step) / max(rate, 1e-9)))


def _flatten(tree: Dict[str, Any]) -> Dict[str, float]:
  """{'a': {'b': 1}} -> {'a/b': 1.0}, keeping only numbers."""
  return {key: float(value) for key, value in traverse_util.flatten_dict(tree, sep='/').items()
          if isinstance(value, (int, float))}
