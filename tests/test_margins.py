"""The shared margin arithmetic: cosines to centres (against autograd's own gradient), sub-centres."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.margins import centre_cosines, subcenter_cosines


def test_centre_cosines_and_their_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    embeddings = torch.randn(5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    centres = (3 * torch.randn(9, 7, dtype=torch.float64, generator=g)).requires_grad_(True)  # not unit length
    cosines = centre_cosines(embeddings, centres)
    assert torch.allclose(cosines, F.cosine_similarity(embeddings[:, None], centres[None], dim=2), atol=1e-12)
    # Finite differences of the function itself, then autograd through F.normalize as a second reference.
    assert torch.autograd.gradcheck(centre_cosines, (embeddings, centres))
    weights = torch.randn(5, 9, dtype=torch.float64, generator=g)
    inputs = (embeddings, centres)
    ours = torch.autograd.grad((centre_cosines(embeddings, centres) * weights).sum(), inputs)
    plain = torch.autograd.grad((F.normalize(embeddings) @ F.normalize(centres).T * weights).sum(), inputs)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(ours, plain))


def test_subcenters_of_one_are_the_cosines_and_k_takes_the_closest() -> None:
    cos = torch.tensor([[0.1, 0.7, -0.2, 0.3, 0.0, -0.9]])
    assert subcenter_cosines(cos, 1) is cos
    assert torch.equal(subcenter_cosines(cos, 3), torch.tensor([[0.7, 0.3]]))
    assert torch.equal(subcenter_cosines(cos, 2), torch.tensor([[0.7, 0.3, 0.0]]))
