"""The Attention U-Net: the seed's parameter count, shapes, and the hand-written ops."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brainseg import models


def _init(model, shape):
  return jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape)))()


def test_default_network_has_the_seeds_parameter_count():
  # ../shared/bench/torch_reference.py: sum(p.numel() for p in model.parameters()).
  variables = jax.eval_shape(lambda: models.AttentionUNet().init(
      jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 1))))
  assert models.count_params(variables['params']) == 1_966_373


def test_parameter_count_grows_with_input_channels():
  variables = jax.eval_shape(lambda: models.AttentionUNet().init(
      jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
  assert models.count_params(variables['params']) == 1_966_373 + 2 * 9 * 16


@pytest.mark.parametrize('features,channels', [((4, 8), 1), ((4, 8, 16), 3)])
def test_output_is_one_logit_per_pixel(features, channels):
  model = models.AttentionUNet(features=features)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, channels))
  variables = _init(model, x.shape)
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert logits.shape == (2, 16, 16, 1) and logits.dtype == jnp.float32
  _, state = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
      variables, x)
  assert jax.tree.structure(state['batch_stats']) == jax.tree.structure(variables['batch_stats'])


def test_attention_maps_are_sown():
  model = models.AttentionUNet(features=(4, 8, 16))
  x = jnp.ones((1, 16, 16, 1))
  _, inter = jax.jit(lambda v, x: model.apply(v, x, mutable=['intermediates']))(
      _init(model, x.shape), x)
  maps = inter['intermediates']
  assert maps['attention_0'][0].shape == (1, 16, 16, 1)
  assert maps['attention_1'][0].shape == (1, 8, 8, 1)
  assert 0 <= float(maps['attention_0'][0].min()) <= float(maps['attention_0'][0].max()) <= 1


def test_max_pool_matches_flax():
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 6, 3))
  np.testing.assert_array_equal(models.max_pool_2x2(x), nn.max_pool(x, (2, 2), (2, 2)))


def test_upconv_is_pytorch_conv_transpose_2x2_stride_2():
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 4, 3))
  ours = models.UpConv2x2(6)
  variables = ours.init(jax.random.PRNGKey(4), x)
  kernel = np.asarray(variables['params']['kernel'])  # (in, 2, 2, out), as torch's (in, out, 2, 2).
  variables['params']['bias'] = jnp.arange(6.0)
  # ConvTranspose2d(k=2, s=2): out[2i+a, 2j+b, f] = sum_c x[i, j, c] * W[c, f, a, b] + bias[f].
  expected = np.zeros((2, 10, 8, 6), np.float32)
  for a in range(2):
    for b in range(2):
      expected[:, a::2, b::2, :] = np.einsum('nhwc,cf->nhwf', np.asarray(x), kernel[:, a, b])
  expected += np.arange(6.0)
  np.testing.assert_allclose(ours.apply(variables, x), expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params():
  model = models.AttentionUNet(features=(4, 8), dtype=jnp.bfloat16)
  variables = _init(model, (1, 8, 8, 1))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  out = jax.jit(model.apply)(variables, jnp.ones((1, 8, 8, 1)))
  assert out.dtype == jnp.float32


def test_importing_brainseg_does_not_import_tensorflow():
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  from tests import conftest  # pylint: disable=g-import-not-at-top
  code = ('import sys, brainseg.train, brainseg.evaluate, brainseg.check_data; '
          'print("tensorflow" in sys.modules)')
  result = subprocess.run([sys.executable, '-c', code], cwd=conftest.REPO, text=True,
                          capture_output=True, env=conftest.subprocess_env(), check=True)
  assert result.stdout.strip() == 'False'


def test_concat_conv_is_nn_conv_on_the_concatenation():
  a = jax.random.normal(jax.random.PRNGKey(5), (2, 8, 8, 3))
  b = jax.random.normal(jax.random.PRNGKey(6), (2, 8, 8, 5))
  ours, reference = models.ConcatConv3x3(4), nn.Conv(4, (3, 3), padding=1)
  variables = ours.init(jax.random.PRNGKey(7), [a, b])
  reference_variables = reference.init(jax.random.PRNGKey(7), jnp.concatenate([a, b], -1))
  # Same parameter names, shapes and initial values: checkpoints carry over.
  jax.tree.map(np.testing.assert_array_equal, variables, reference_variables)
  variables['params']['bias'] = jnp.arange(4.0)
  np.testing.assert_allclose(ours.apply(variables, [a, b]),
                             reference.apply(variables, jnp.concatenate([a, b], -1)),
                             rtol=1e-5, atol=1e-5)
