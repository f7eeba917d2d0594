"""GRZO: one direction per example of the batch, the differences normalized within the batch
(a group-relative step), for the cost of MeZO's two forward passes."""

from __future__ import annotations

import torch

from zoptim.methods.evolution import EGGROLL
from zoptim.methods.subspace import LowRankMethod
from zoptim.parts.estimators import GroupRelative


class GRZO(LowRankMethod):
    """GRZO (Tan et al., 2026, "GRZO: Group-Relative Zeroth-Order Optimization for Large
    Language Model Fine-Tuning", arXiv 2606.02857): each of the batch's ``B`` examples is
    evaluated at its own perturbation ``+-eps z_b``, all of them in two forward passes of the
    batch, and the differences are normalized within the batch (a group-relative step,
    ``parts.estimators.GroupRelative``): ``B`` directions a step instead of MeZO's one, for
    the cost of MeZO's two forward passes.

    The update, with ``f_b`` example ``b``'s loss:

        delta_b = f_b(theta + eps z_b) - f_b(theta - eps z_b)
        a_b = delta_b / (std(delta) + 1e-8)           (normalize=False: a_b = delta_b)
        theta <- theta - lr * (sum_b a_b z_b / (2 eps B) + weight_decay * theta)

    The perturbations live on activations, so this method needs the model and batched queries
    (``engine.evaluators.batched``, ``evaluate_rows``): the closure is called as
    ``closure(slices)`` for a stacked batch, and while it runs ``stack`` leaves its batch as
    it is, each example one slice. A batch must hold exactly ``examples`` examples, the same
    number of rows each (one for classification and SFT's teacher-forced completions; for
    multiple choice, as many as the most options of the batch, padded). Greedy decoding (a
    metric of generations, a reward) is refused. A model batched queries cannot serve is
    refused: in place, each example would cost a forward pass.

    Spaces: where the paper builds ``z_b`` by Flipout, ``U * (r_b s_b^T)`` (one dense ``U``
    and per-example signs), here a matrix's ``z_b`` is a rank-``r`` product ``A_b B_b^T /
    sqrt(r)`` of Gaussian factors drawn per example (``parts.spaces.Bilinear``, EGGROLL's),
    which a layer applies as a per-row low-rank correction of its output, ``eps (x_b B_b)
    A_b^T / sqrt(r)``: directions independent across examples with ``E[z z^T] = I`` as the
    paper's, no dense tensor drawn, at ``O(r (m + n))`` a token instead of another product
    with a dense ``U``. Vectors (biases, norms) take dense per-example noise. Served: the
    weights and biases of ``nn.Linear``, ``nn.Embedding`` weights, ``nn.LayerNorm``, and
    small heads (see ``engine.evaluators.batched``).

    Args:
        params (iterable): tensors or parameter groups (dicts with per-group settings), as
            for any ``torch.optim`` optimizer.
        model (torch.nn.Module): the module the closure runs (required).
        examples (int): the batch's size ``B``, one direction per example (``zoptim train``
            sets it from ``batch_size``).
        lr (float, optional): learning rate. Default: 1e-6.
        eps (float, optional): perturbation scale (the finite difference's step).
            Default: 1e-3.
        rank (int, optional): the rank ``r`` of a matrix's per-example perturbation (capped
            by the matrix). Default: 1.
        normalize (bool, optional): divide the differences by their spread (the paper's
            method); ``False`` gives the plain per-example central difference, unbiased for
            the batch's loss. Default: True.
        weight_decay (float, optional): decoupled weight decay,
            ``p <- p (1 - lr * weight_decay)``, applied to every tensor of a group (put
            biases and norms in a group of their own to exempt them). Default: 0.0.
        noise (str, optional): ``"gaussian"`` or ``"rademacher"`` perturbations of the
            vectors. Default: ``"gaussian"``.
        seed (int, optional): every direction derives from it (random when ``None``); two
            optimizers with one seed and one objective take the same steps. Default: None.
        foreach (bool, optional): write the tensors of one shape together (one
            ``_foreach_add_`` a set) rather than one by one; ``None``: on CUDA
            (``torch.optim``'s rule) and under batched queries (see ``ZOOptimizer``).
            Default: None.
    """

    uses_model = "required"
    per_example_directions = True
    space = EGGROLL.space  # rank-r products for matrices, dense noise for vectors

    def __init__(self, params, model: torch.nn.Module, examples: int, lr: float = 1e-6,
                 eps: float = 1e-3, rank: int = 1, normalize: bool = True,
                 weight_decay: float = 0.0, noise: str = "gaussian", seed: int | None = None,
                 foreach: bool | None = None):
        if model is None:
            raise ValueError("GRZO perturbs each example through the model's activations: "
                             "pass model=")
        super().__init__(params, dict(lr=lr, eps=eps, rank=rank, resample_every=1,
                                      weight_decay=weight_decay, noise=noise),
                         GroupRelative(examples, normalize), lambda g: {},
                         seed=seed, foreach=foreach, model=model, batched=True)
