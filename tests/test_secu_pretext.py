"""SeCu on a frozen pretext's features: its centers started at k-means' partition (init: kmeans) and placed on the
encoder's own features (center_space: backbone). The equivalence tests of both are in tests/test_secu.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from djc.methods.base import DataInfo, EpochContext
from djc.methods.kmeans import assign, kmeans
from djc.step import build_method
from tests.gloo import sharded_map_train
from tests.test_secu import N, _cfg


@pytest.mark.parametrize("init", ["random", "kmeans"])
def test_kmeans_init_starts_every_head_at_the_k_means_partition_of_its_features(init):
    """init=kmeans: at epoch 0 each head's centers are k-means' on the embedded training set, so its argmax is
    k-means' partition (four well-separated image patterns); random centers are not (the test can fail)."""
    cfg = _cfg(1, f"entropy-{init}")
    method = build_method(cfg, DataInfo(N, (8, 8, 1), 4))
    g = torch.Generator().manual_seed(5)
    patterns = 3 * torch.randn(4, 1, 8, 8, generator=g)
    truth = torch.arange(N) % 4
    data = patterns[truth] + 0.05 * torch.randn(N, 1, 8, 8, generator=g)
    method.on_epoch_start(EpochContext(0, 3, 1, sharded_map_train(method, data, 0, 1)))
    method.eval()
    with torch.no_grad():
        f = method.embed(data)
    for h, head in enumerate(method.heads):
        km = kmeans(f, head.num_clusters, iters=10, restarts=2, seed=cfg.seed + h)
        placed = torch.allclose(head.centers(), F.normalize(km.centers, dim=1).T, atol=1e-6)
        assert placed == (init == "kmeans"), h
        assert torch.equal(head.w_prev, head.centers())  # the representation loss's snapshot is the new centers
        if h == 0:  # K = the four patterns: the head's argmax is k-means' partition
            same = (method.predict(data).clusters[:, 0] == assign(f, km.centers)[0]).float().mean().item()
            assert (same == 1.0) == (init == "kmeans"), same


@pytest.mark.parametrize("space", ["projection", "backbone"])
def test_backbone_center_space_puts_the_centers_on_the_encoders_own_features(space):
    """center_space=backbone: no projection head; the centers have the encoder's width and SeCu assigns the
    encoder's normalised features themselves. The release's projection head maps them elsewhere."""
    cfg = _cfg(1, f"entropy-{space}")
    method = build_method(cfg, DataInfo(N, (8, 8, 1), 4))
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    method.eval()
    with torch.no_grad():
        f = F.normalize(method.encode(x), dim=1)
        z = method.embed(x)
    widths = {head.weight.shape[0] for head in method.heads}
    has_proj = any(name.startswith("proj.") for name, _ in method.named_parameters())
    if space == "backbone":
        assert widths == {f.shape[1]} and not has_proj
        assert torch.allclose(z, f)
        logits = z @ method.heads[0].centers()
        assert torch.equal(method.predict(x).clusters[:, 0], logits.argmax(dim=1))
    else:
        assert widths == {cfg.model.proj_dim} and has_proj and not torch.allclose(z, f)
