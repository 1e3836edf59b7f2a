"""What one benchmark row times: the model in both frameworks, the library's formulations
of the per-example gradients, and the functions of each part (`part_fns`).

Used by the benchmark (`nio_jax.bench.engine`), its memory subprocesses
(`nio_jax.bench.memory`) and `benchmarks/profile_step.py`, so that all three time the same
computation.
"""

from __future__ import annotations

import numpy as np

from nio_jax.bench import require_torch

ALL_MODELS = (
  "mlp",
  "resnet20",
  "resnet20_bn",
  "resnet56",
  "resnet56_bn",
  "resnet110",
  "resnet110_bn",
  "vgg19",
  "vgg19_bn",
  "vit_mini",
)
ALL_PARTS = ("pe", "gc", "nio_sw", "nio_b", "gradinit", "metainit", "train")
NIO_B_CHUNKS, NIO_B_OVERLAP = 4, 0.2  # the released batch setting
# Batch-setting pullbacks refused for a loss with cross-example coupling (batch norm).
UNCOUPLED_ONLY = ("segments", "sites")
# A model without normalisation whose logits at init exceed this std gets scaled inputs
# (`build`): the bench then times the same computation without a saturated softmax.
LOGIT_STD_MAX = 10.0


class PartSkipped(Exception):
  """A part that does not apply to a row (the reason is the message)."""


def model_spec(name: str):
  """(registry name, kwargs, has_bn) of a bench model name."""
  if name.startswith("resnet"):
    bn = name.endswith("_bn")
    return name.split("_")[0], dict(norm="bn" if bn else "none"), bn
  if name.startswith("vgg"):
    return name, {}, name.endswith("_bn")
  return name, {}, False


# ------------------------------------------------------------------------------------------
# The library's formulation option: the only place the bench names it.


# A formulation `form` is the string "pullback/conv" (e.g. "loop/im2col"), the label of its
# row; the command line gives the pullbacks and conv modes, and every pair is timed.


def formulations(pullbacks, convs, num_chunks, backend: str, spec=None) -> list[str]:
  """Every "pullback/conv" pair of the two lists, "auto" resolved as the library does (for
  the row `spec`'s loss when given: the batch setting's auto pullback depends on it)."""
  from nio_jax import formulation

  auto_p, auto_c = formulation.default_formulation(num_chunks, backend=backend)
  if spec is not None:
    jbatch = {"image": spec["x"][: spec["batch"]], "label": spec["y"][: spec["batch"]]}
    auto = formulation.auto_subbatch_pullback if num_chunks else formulation.auto_sample_pullback
    auto_p = auto(spec["loss_fn"], spec["params"], jbatch, backend)
  return [
    f"{auto_p if p == 'auto' else p}/{auto_c if c == 'auto' else c}"
    for p in pullbacks or ["auto"]
    for c in convs or ["auto"]
  ]


def default_formulations(backend: str, spec=None) -> tuple[list[str], list[str]]:
  """The library's default formulation for the sample-wise and the batch setting (for the
  row `spec`'s loss when given)."""
  return (
    formulations([], [], None, backend, spec),
    formulations([], [], NIO_B_CHUNKS, backend, spec),
  )


def split_form(form: str) -> dict:
  """`{"pullback": ..., "conv": ...}` of a "pullback/conv" label."""
  pullback, conv = form.split("/")
  return dict(pullback=pullback, conv=conv)


def search_convs(forms_b) -> list[str]:
  """The conv modes the GradInit / MetaInit parts time: those of the batch-setting
  formulations (`--conv-b`), or the library's default ("auto") when there are none."""
  return sorted({split_form(f)["conv"] for f in forms_b}) or ["auto"]


def jax_gradcosine(loss_fn, params, batch, num_chunks, overlap, wrt, form):
  """GradCosine statistics of one batch with formulation `form`."""
  from nio_jax import cosine

  return cosine.gradcosine(
    loss_fn, params, batch, num_chunks=num_chunks, overlap=overlap, wrt=wrt, **split_form(form)
  )


def jax_per_example_fn(loss_fn, wrt, form):
  """Jitted `(params, batch) -> per-example gradients` with formulation `form`."""
  import jax

  from nio_jax import formulation, per_example

  f = split_form(form)

  def grads(p, b):
    resolved = formulation.resolve_formulation(
      loss_fn, p, b, None, f["pullback"], f["conv"], grads=True
    )
    return per_example.sample_grads_selected(loss_fn, p, b, resolved, wrt)[1]

  return jax.jit(grads)


def jax_gc_fn(loss_fn, wrt, form):
  """Jitted `(params, batch) -> sample-wise GradCosine` with formulation `form`."""
  import jax

  from nio_jax import cosine

  return jax.jit(
    lambda p, b: cosine.gradcosine_stats(loss_fn, p, b, wrt=wrt, **split_form(form)).gc
  )


def jax_nio_config(num_chunks, overlap, form):
  """The NIOConfig of one NIO step with formulation `form`."""
  from nio_jax.methods import nio

  return nio.NIOConfig(num_chunks=num_chunks, overlap=overlap, **split_form(form))


# ------------------------------------------------------------------------------------------
# Building a row: the model in both frameworks, and each part's functions.


def build(name: str, batch: int, seed: int = 0):
  """The Flax model, its variables, loss and a deterministic batch pair for one row."""
  import jax
  import jax.numpy as jnp

  from nio_jax import models
  from nio_jax.flax_utils import linen_loss_fn

  reg, kw, has_bn = model_spec(name)
  model = models.get(reg, **kw)
  h, w, c = models.input_shape(reg)
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2 * batch, h, w, c)).astype(np.float32)
  y = rng.integers(0, 10, size=(2 * batch,)).astype(np.int32)
  variables = model.init(jax.random.key(seed), jnp.asarray(x[:2]), train=False)
  bs = variables.get("batch_stats")
  input_scale = 1.0
  if not has_bn:
    # Deep nets without normalisation (ResNet-56 without BN) have logits of std ~1e5 at
    # Kaiming init: softmax saturates, some examples' loss and gradient are exactly 0 and the
    # sample-wise GC is undefined. The inputs are synthetic, so they are scaled (in both
    # frameworks alike) to give logits of unit std; weights and computation are unchanged.
    std = float(jnp.std(model.apply(variables, jnp.asarray(x[:batch]), train=False)))
    if np.isfinite(std) and std > LOGIT_STD_MAX:
      input_scale = 1.0 / std
      x = (x * input_scale).astype(np.float32)
  return dict(
    name=name,
    reg=reg,
    kw=kw,
    has_bn=has_bn,
    model=model,
    variables=variables,
    params=variables["params"],
    batch_stats=bs,
    loss_fn=linen_loss_fn(model, batch_stats=bs),
    x=x,
    y=y,
    batch=batch,
    input_scale=input_scale,
  )


def torch_device(jax_backend: str):
  """(torch device, None) for the JAX backend in use, or (None, why not)."""
  torch = require_torch()
  if jax_backend == "cpu":
    return "cpu", None
  if jax_backend in ("gpu", "cuda", "rocm") and torch.cuda.is_available():
    return "cuda", None
  return None, f"torch has no {jax_backend} device here"


def build_torch(spec, device) -> dict:
  """The PyTorch twin with the Flax weights, and the row's inputs as tensors on `device`."""
  torch = require_torch()
  from nio_jax.bench.torch_baseline import algorithms
  from nio_jax.bench.torch_baseline import models as torch_models

  tm = torch_models.get(spec["reg"], **spec["kw"])
  torch_models.load_flax_variables(tm, spec["variables"])
  tm = tm.to(device).train()
  batch, half = spec["batch"], spec["batch"] // 2

  def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2)))).to(device)

  return dict(
    TA=algorithms,
    model=tm,
    device=device,
    x=nchw(spec["x"][:batch]),
    y=torch.from_numpy(spec["y"][:batch].astype(np.int64)).to(device),
    x2=nchw(spec["x"][batch : batch + half]),
    y2=torch.from_numpy(spec["y"][batch : batch + half].astype(np.int64)).to(device),
  )


def part_fns(part: str, spec: dict, forms_sw, forms_b, tctx: dict | None, hvp: str = "jvp"):
  """The functions one part times.

  Args:
    part: one of ALL_PARTS.
    spec: the row, from `build`.
    forms_sw: formulations of the sample-wise setting to time.
    forms_b: formulations of the batch setting to time.
    tctx: the PyTorch twin and inputs (`build_torch`), or None.
    hvp: MetaInit's Hessian-vector product form (`MetaInitConfig.hvp`) for `metainit`.

  Returns:
    `(jax_fns, torch_fn)`: `{label: (jitted fn, args)}` and a zero-argument callable (None
    without `tctx`).

  Raises:
    PartSkipped: the part does not apply to this row.
  """
  import copy

  import jax
  import jax.numpy as jnp
  import optax

  from nio_jax import leaves
  from nio_jax import scales as scmod

  batch = spec["batch"]
  jbatch = {"image": jnp.asarray(spec["x"][:batch]), "label": jnp.asarray(spec["y"][:batch])}
  jnext = {"image": jnp.asarray(spec["x"][batch:]), "label": jnp.asarray(spec["y"][batch:])}
  params, loss_fn = spec["params"], spec["loss_fn"]
  wrt = leaves.resolve_grad_filter("default", loss_fn, params)  # what the search uses
  scales0, sspec = scmod.init_scales(params)
  TA = tctx["TA"] if tctx else None
  if part in ("pe", "gc", "nio_sw") and spec["has_bn"]:
    raise PartSkipped(
      "sample-wise GradCosine is not defined for a model with batch norm (cross-example "
      "coupling); the released code uses the batch setting"
    )
  torch_fn = None
  if part == "pe":
    grad_forms = [f for f in forms_sw if split_form(f)["pullback"] != "norms"]
    if not grad_forms:
      raise PartSkipped("pullback 'norms' builds no per-example gradients")
    jfns = {f: (jax_per_example_fn(loss_fn, wrt, f), (params, jbatch)) for f in grad_forms}
    if tctx:
      sm = TA.ScaledModel(tctx["model"])
      pd = {n: v.detach() for n, v in sm.params().items()}
      torch_fn = lambda: TA.per_example_grads(sm, pd, tctx["x"], tctx["y"])
  elif part == "gc":
    jfns = {f: (jax_gc_fn(loss_fn, wrt, f), (params, jbatch)) for f in forms_sw}
    if tctx:
      sm = TA.ScaledModel(tctx["model"])
      torch_fn = lambda: TA.gradcosine(sm, tctx["x"], tctx["y"])
  elif part in ("nio_sw", "nio_b"):
    from nio_jax.methods import nio

    d, r = (None, 0.0) if part == "nio_sw" else (NIO_B_CHUNKS, NIO_B_OVERLAP)
    jfns = {}
    for f in forms_sw if d is None else forms_b:
      if spec["has_bn"] and split_form(f)["pullback"] in UNCOUPLED_ONLY:
        continue  # refused with batch norm (not exact); the row notes it
      search = nio.make_nio_step(loss_fn, sspec, jax_nio_config(d, r, f))
      jfns[f] = (search.step, (params, scales0, search.init(scales0), jbatch))
    if not jfns:
      raise PartSkipped(
        f"pullback={'/'.join(UNCOUPLED_ONLY)} is refused for a model with batch norm (not exact)"
      )
    if tctx:
      sm = TA.ScaledModel(tctx["model"])
      opt = TA.RescaleAdam(sm, 3e-3)
      torch_fn = lambda: TA.nio_step(sm, opt, tctx["x"], tctx["y"], num_chunks=d, overlap=r)
  elif part == "gradinit":
    from nio_jax.methods.gradinit import GradInitConfig, make_gradinit_step

    jfns = {}
    for conv in search_convs(forms_b):
      cfg = GradInitConfig.create(None, batch_size=batch, conv=conv)
      search = make_gradinit_step(loss_fn, sspec, cfg)
      # `step` closes over the scale spec and calls the cached jitted step: jit it (the inner
      # jit inlines) so the bench can lower and compile it like the other parts' steps
      args = (params, scales0, search.init(scales0), jbatch, jnext)
      jfns[f"conv={conv}"] = (jax.jit(search.step), args)
    if tctx:
      sm = TA.ScaledModel(tctx["model"], grad_filter=lambda n: True)
      opt = TA.RescaleAdam(sm, 1e-3)
      torch_fn = lambda: TA.gradinit_step(
        sm, opt, tctx["x"], tctx["y"], tctx["x2"], tctx["y2"], eta=0.1, gamma=1.0
      )
  elif part == "metainit":
    from nio_jax.methods.metainit import MetaInitConfig, make_metainit_step

    jfns = {}
    for conv in search_convs(forms_b):
      search = make_metainit_step(loss_fn, sspec, MetaInitConfig.create(conv=conv, hvp=hvp))
      # as for GradInit: jit the wrapper so that the bench can lower and compile it
      args = (params, scales0, search.init(scales0), jbatch)
      jfns[f"conv={conv}"] = (jax.jit(search.step), args)
    if tctx:
      sm = TA.ScaledModel(tctx["model"], grad_filter=lambda n: True)
      mom = {}
      torch_fn = lambda: TA.metainit_step(sm, mom, tctx["x"], tctx["y"], lr=0.1, mom=0.9)
  elif part == "train":
    opt = optax.sgd(0.1, momentum=0.9)
    mdl, bs = spec["model"], spec["batch_stats"]

    def jtrain(p, o, stats, b):
      def lf(p):
        if stats is None:
          return optax.softmax_cross_entropy_with_integer_labels(
            mdl.apply({"params": p}, b["image"]), b["label"]
          ).mean(), None
        logits, upd = mdl.apply(
          {"params": p, "batch_stats": stats}, b["image"], train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, b["label"]).mean()
        return loss, upd["batch_stats"]

      (l, new), g = jax.value_and_grad(lf, has_aux=True)(p)
      u, o = opt.update(g, o, p)
      return optax.apply_updates(p, u), o, new, l

    # as the library's trainer: canonical convolutions on XLA:CPU (jaxpr_rewrites.canonical_convs)
    from nio_jax.jaxpr_rewrites import canonical_convs  # noqa: PLC0415

    jfns = {"default": (jax.jit(canonical_convs(jtrain)), (params, opt.init(params), bs, jbatch))}
    if tctx:
      step = TA.make_train_step(copy.deepcopy(tctx["model"]), 0.1)
      torch_fn = lambda: step(tctx["x"], tctx["y"])
  else:
    raise ValueError(f"unknown part {part!r}; known: {ALL_PARTS}")
  return jfns, torch_fn
