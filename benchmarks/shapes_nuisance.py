"""What do clusters of learned shapes features follow: the class, or a nuisance the views did not remove?

usage: python benchmarks/shapes_nuisance.py FEATURES.pt [--k K] [--within N]
FEATURES.pt is what `benchmarks/shapes_probe.py ... --save FEATURES.pt` wrote (the train split's features, labels
and the indices kept from the balanced source). k-means (K clusters, djc's own) runs on the features; each line
printed is the NMI of those clusters with the class and with every per-image nuisance of djc/data/shapes.py,
binned into 10 quantiles (the same number of values as the classes, so the NMIs compare). A nuisance with an NMI
near the class's is a direction the features kept and k-means split on: a view the augmentations do not cover.
--within N: also, for each of the N largest classes, k-means into 2 of that class's features alone and the NMI of
that split with each nuisance cut at its median: what divides a head class that k-means cuts in two.
"""

import argparse
import json

import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score as nmi

from djc.data import shapes
from djc.methods.kmeans import assign, kmeans

ap = argparse.ArgumentParser()
ap.add_argument("features")
ap.add_argument("--k", type=int, default=10)
ap.add_argument("--within", type=int, default=0)
a = ap.parse_args()
saved = torch.load(a.features)
feats, labels, keep = saved["features"], saved["labels"].numpy(), saved["keep"].numpy()
# the probe renders the balanced train source of seed 0 and keeps its long-tailed subset: the same draws here
n_source = len(shapes.CLASSES) * shapes.PER_CLASS["train"]
p = {k: v[keep] for k, v in shapes._draw_params(np.random.default_rng([0, 0]), n_source).items()}
luma = np.array([0.2989, 0.587, 0.114], dtype=np.float32)
nuisances = {
    "radius": p["radius"], "aspect": np.abs(p["log_aspect"]), "angle": p["angle"],
    "centre_x": p["cx"], "centre_y": p["cy"],
    "object_luma": p["obj_rgb"] @ luma, "background_luma": p["bg_a"] @ luma,
    "contrast": p["obj_rgb"] @ luma - p["bg_a"] @ luma,
    # the object's dominant channel, then that channel's level
    "object_hue": np.argmax(p["obj_rgb"], 1).astype(np.float32) + p["obj_rgb"].max(1),
    "background_texture": p["bg_texture"], "clutter": p["clutter"].astype(np.float32), "noise": p["noise"],
}
km = kmeans(feats.float(), a.k, iters=50, restarts=3, seed=0)
clusters = assign(feats.float(), km.centers)[0].numpy()
rows = {"class": nmi(labels, clusters)}
for name, v in nuisances.items():
    edges = np.unique(np.quantile(v, np.linspace(0, 1, 11)[1:-1]))
    rows[name] = nmi(np.digitize(v, edges), clusters)
for name, value in sorted(rows.items(), key=lambda kv: -kv[1]):
    print(json.dumps({"nmi_with": name, "nmi": round(float(value), 4)}))
for c in np.argsort(-np.bincount(labels))[:a.within]:
    mask = labels == c
    half = assign(feats[mask].float(), kmeans(feats[mask].float(), 2, iters=50, restarts=3, seed=0).centers)[0].numpy()
    split = {name: round(float(nmi(v[mask] > np.median(v[mask]), half)), 4) for name, v in nuisances.items()}
    top = max(split, key=split.get)
    print(json.dumps({"class": shapes.CLASSES[c], "size": int(mask.sum()), "split_nmi_with": dict(
        sorted(split.items(), key=lambda kv: -kv[1])[:3]), f"{top}_means": [round(float(nuisances[top][mask][half == h].mean()), 3) for h in (0, 1)]}))
