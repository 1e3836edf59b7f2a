"""Cross-framework check: nio_jax against a PyTorch implementation written here, on identical
weights and inputs (torch.func vmap(grad) for per-example gradients, autograd.grad with
create_graph=True for sub-batch gradients, as the released code does)."""

import jax
import numpy as np
import pytest

import nio_jax
from tests import tiny_models as tm

torch = pytest.importorskip("torch")
F = torch.nn.functional
torch.set_num_threads(2)
KEY = jax.random.PRNGKey(11)
RTOL = 1e-4


def to_torch(params):
  """Flat {name: tensor} in torch layout (dense kernels (in,out) -> (out,in); HWIO -> OIHW)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = ".".join(k.key for k in path)
    a = np.asarray(leaf, np.float32)
    if a.ndim == 2:
      a = a.T
    elif a.ndim == 4:
      a = a.transpose(3, 2, 0, 1)
    out[name] = torch.tensor(np.ascontiguousarray(a))
  return out


def t_mlp(p, x):
  n = len([k for k in p if k.endswith(".kernel")])
  for i in range(n):
    x = F.linear(x, p[f"dense{i}.kernel"], p[f"dense{i}.bias"])
    if i < n - 1:
      x = torch.tanh(x)
  return x


def t_conv(p, x):
  x = x.permute(0, 3, 1, 2)
  h = F.relu(F.conv2d(x, p["conv0.kernel"], p["conv0.bias"], padding=1))
  h = torch.tanh(F.conv2d(h, p["conv1.kernel"], p["conv1.bias"], padding=1))
  h = h.mean(dim=(2, 3))
  return F.linear(h, p["head.kernel"], p["head.bias"])


def t_losses(model, p, x, y):
  return F.cross_entropy(model(p, x), y, reduction="none")


def t_gc(grads):
  """The released code's cal_cos_similarity on a [D, P] matrix."""
  d = grads.shape[0]
  norm = grads.norm(dim=1)
  sim = (grads @ grads.t()) / (norm[:, None] * norm[None])
  sim = sim - torch.diag(torch.diag(sim))
  return sim.sum() / (d * d - d), norm


def t_samplewise(model, p, x, y):
  from torch.func import grad, vmap

  def one(pp, xi, yi):
    return t_losses(model, pp, xi[None], yi[None])[0]

  g = vmap(grad(one), in_dims=(None, 0, 0))(p, x, y)
  flat = torch.cat([g[k].reshape(x.shape[0], -1) for k in p], dim=1)
  return t_gc(flat)


def t_batch(model, p, x, y, d, r):
  loss = t_losses(model, p, x, y)
  names = list(p)
  rows = []
  for a, e in nio_jax.subbatch_bounds(x.shape[0], d, r):
    gs = torch.autograd.grad(
      loss[a:e].mean(), [p[k] for k in names], retain_graph=True, create_graph=True
    )
    rows.append(torch.cat([g.reshape(-1) for g in gs]))
  return t_gc(torch.stack(rows))


MODELS = {
  "mlp": (tm.mlp_params, tm.mlp_loss, lambda k: tm.mlp_batch(k, b=12), t_mlp),
  "conv": (tm.conv_params, tm.conv_loss, lambda k: tm.conv_batch(k, b=12), t_conv),
}


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("setting", ["sample", "batch"])
def test_gc_norms_and_scale_gradient_match_pytorch(model, setting):
  mkp, loss, mkb, tmodel = MODELS[model]
  params, batch = mkp(KEY), mkb(jax.random.PRNGKey(12))
  kw = (
    {"num_chunks": None, "overlap": 0.0}
    if setting == "sample"
    else {"num_chunks": 4, "overlap": 0.2}
  )
  scales, _ = nio_jax.init_scales(params)
  scales = jax.tree_util.tree_map(lambda s: s * 0.9, scales)

  def f(s):
    st = nio_jax.gradcosine(loss, nio_jax.apply_scales(params, s), batch, check=False, **kw)
    return st.gc, st

  (gc_j, st_j), dgc_j = jax.value_and_grad(f, has_aux=True)(scales)

  w0 = to_torch(params)
  s_t = {k: torch.tensor(0.9, requires_grad=True) for k in w0}
  p_t = {k: s_t[k] * w0[k] for k in w0}
  x = torch.tensor(np.asarray(batch["x"]))
  y = torch.tensor(np.asarray(batch["y"]), dtype=torch.long)
  if setting == "sample":
    gc_t, norm_t = t_samplewise(tmodel, p_t, x, y)
  else:
    gc_t, norm_t = t_batch(tmodel, p_t, x, y, 4, 0.2)
  gc_t.backward()

  np.testing.assert_allclose(float(gc_j), gc_t.item(), rtol=RTOL)
  np.testing.assert_allclose(np.asarray(st_j.grad_norms), norm_t.detach().numpy(), rtol=RTOL)
  for path, g in jax.tree_util.tree_leaves_with_path(dgc_j):
    name = ".".join(k.key for k in path)
    np.testing.assert_allclose(float(g), s_t[name].grad.item(), rtol=RTOL, atol=1e-6, err_msg=name)
