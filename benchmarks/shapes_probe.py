"""The RGB benchmark's probe: a job's method trained through djc's own step (build_method, ViewPair, train_step)
in one process, without Ray, on long-tailed `shapes` in memory, with the features read every --eval-every steps.
By the equivalence tests a 1-process run is the 2-worker run's algorithm; it skips Ray's start-up and lets two
probes share 2 cores (--threads 1 each). What docs/results.md's RGB section reports was printed by this script.

usage: python benchmarks/shapes_probe.py JOB [key=value ...] [--minutes M] [--eval-every S] [--threads T]
       [--pixels]  k-means and 20-NN on the pixels instead of training
       [--time-steps N]  seconds per training step (views + train_step, mean of N after one warm-up) instead
       [--save PATH]  write the final features (and the backbone's), labels and the kept indices (torch.save)
       [--spec field=value]  override a field of both views' ViewSpec (e.g. hue=0.5)
       [--variant flat,clut2,lownoise,light,noclut,soft]  render the train split with milder nuisances
       [--gray-all]  turn the data grey before anything (colour removed from the data, not by the views)
       [--remap P]  with probability P a view's channels are permuted and each inverted with probability 1/2
       [--oracle-negatives B]  DCL's negatives weighted by (mean class count / their class's count)^B: the labels'
                 class-balanced uniformity, an oracle of label-free rebalancing (docs/results.md "Four more tries")
       [--split-scale LO,MID,HI]  view 1 crops LO-MID of the area, view 2 MID-HI: the views' scales set apart
       [--max-pool]  the backbone's global average pooling replaced by global max pooling
       [--device cuda]  train on that device (the data set held there; the scores computed on the CPU)
Each line printed is JSON: km / km_tail = k-means on Prediction.features (balanced ACC, tail classes' ACC),
own / own_tail = the method's clusters, knn = leave-one-out 20-NN balanced ACC, bb_km = k-means on the backbone.
"""

import argparse, json, sys, time
import numpy as np, torch, torch.nn.functional as F
from djc.config import load_config
from djc.data import shapes
from djc.data.longtail import longtail_subset
from djc.data.augment import ViewPair
from djc.step import build_method, to_device, train_step
from djc.optim import make_optimizer, apply_lr, lr_factor
from djc.methods.base import DataInfo, EpochContext
from djc.methods.kmeans import kmeans, assign
from djc import metrics

ap = argparse.ArgumentParser()
ap.add_argument("config"); ap.add_argument("overrides", nargs="*")
ap.add_argument("--eval-every", type=int, default=200)
ap.add_argument("--minutes", type=float, default=10)
ap.add_argument("--ratio", type=float, default=10)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--pixels", action="store_true")
ap.add_argument("--time-steps", type=int, default=0)
ap.add_argument("--tag", default="")
ap.add_argument("--remap", type=float, default=0.0)
ap.add_argument("--variant", default="")
ap.add_argument("--gray-all", action="store_true")
ap.add_argument("--spec", action="append", default=[])
ap.add_argument("--oracle-negatives", type=float, default=0.0)
ap.add_argument("--split-scale", default="")
ap.add_argument("--max-pool", action="store_true")
ap.add_argument("--device", default="cpu")
ap.add_argument("--save", default="", help="write the final features, labels and kept indices to this .pt file")
a = ap.parse_intermixed_args()
torch.set_num_threads(a.threads)
cfg = load_config(a.config, a.overrides)

def gen(variant):
    labels = np.repeat(np.arange(10), 2000); n = len(labels)
    p = shapes._draw_params(np.random.default_rng([0, 0]), n); f = np.float32
    if "flat" in variant: p["bg_b"] = p["bg_a"].copy(); p["bg_texture"] = np.zeros(n, f)
    if "soft" in variant: p["bg_b"] = np.clip(p["bg_a"] + 0.5 * (p["bg_b"] - p["bg_a"]), 0, 1).astype(f); p["bg_texture"] *= 0.5
    if "clut2" in variant: p["clutter"] = np.minimum(p["clutter"], 2); p["clutter_front"][:] = False
    if "noclut" in variant: p["clutter"] = np.zeros(n, np.int64)
    if "lownoise" in variant: p["noise"] = p["noise"] * 0.5
    if "light" in variant:  # object lighter than background
        lum = np.array([0.2989, 0.587, 0.114], f)
        sw = (p["obj_rgb"] @ lum) < (p["bg_a"] @ lum)
        p["obj_rgb"][sw], p["bg_a"][sw] = p["bg_a"][sw].copy(), p["obj_rgb"][sw].copy()
    x = np.concatenate([shapes.render(labels[i:i+1000], {k: v[i:i+1000] for k, v in p.items()}, np.random.default_rng(i)) for i in range(0, n, 1000)])
    return x, labels
X0, Y0 = gen(a.variant) if a.variant else shapes.generate("train", seed=0)
keep = longtail_subset(Y0, 10, a.ratio, seed=0)
counts = np.bincount(Y0[keep], minlength=10)
X, Y = torch.from_numpy(X0[keep]).permute(0, 3, 1, 2).contiguous(), Y0[keep]
if a.gray_all:
    g_ = (X.float() * torch.tensor([0.2989, 0.587, 0.114])[None, :, None, None]).sum(1, keepdim=True)
    X = g_.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
dev = torch.device(a.device)
x32 = X.float().div(255)
mean = x32.mean(dim=(0, 2, 3)).tolist(); std = x32.std(dim=(0, 2, 3)).tolist()
info = DataInfo(len(X), (32, 32, 3), 10)
X = X.to(dev)
views = ViewPair(cfg, mean, std, 32)
import dataclasses
for kv in a.spec:
    k, v = kv.split("="); views.specs = tuple(dataclasses.replace(sp, **{k: float(v)}) for sp in views.specs)
if a.split_scale:
    lo, mid, hi = map(float, a.split_scale.split(","))
    views.specs = (dataclasses.replace(views.specs[0], crop_scale_min=lo, crop_scale_max=mid),
                   dataclasses.replace(views.specs[1], crop_scale_min=mid, crop_scale_max=hi))
print(views.specs, flush=True)
K = cfg.method.num_clusters
N = len(X)

def ev(feats, y, cl=None):
    feats = feats.cpu()
    km = kmeans(feats, K, iters=50, restarts=3, seed=0)
    p = assign(feats, km.centers)[0].numpy()
    r = metrics.evaluate(y, p, K, np.asarray(counts))
    out = {"km": round(r["balanced_acc"], 3), "km_tail": round(r["tail_acc"], 3)}
    if cl is not None:
        r2 = metrics.evaluate(y, cl, K, np.asarray(counts))
        out["own"] = round(r2["balanced_acc"], 3); out["own_tail"] = round(r2["tail_acc"], 3)
    f = F.normalize(feats, dim=1); sims = f @ f.T; sims.fill_diagonal_(-2)
    pred = torch.mode(torch.from_numpy(y)[sims.topk(20, dim=1).indices], dim=1).values.numpy()
    out["knn"] = round(float(np.mean([np.mean(pred[y == c] == c) for c in range(K)])), 3)
    return out

if a.pixels:
    print(json.dumps(ev(views.eval(X).flatten(1).cpu(), Y))); sys.exit()

neg_weight = {"rows": None}  # --oracle-negatives: the weight of each row of the global batch, set every step
if a.oracle_negatives > 0:
    import djc.methods.dcl as dcl_module

    def weighted_negatives(anchors, z_all, pos_index, self_index, temperature, tau_plus):
        """NT-Xent (tau_plus unused) whose negatives are weighted by neg_weight, renormalised to mean 1 per anchor."""
        logits = (anchors @ z_all.T - 1.0) / temperature
        pos_logit = logits.gather(1, pos_index[:, None])[:, 0]
        neg = torch.ones_like(logits, dtype=torch.bool)
        neg.scatter_(1, pos_index[:, None], False); neg.scatter_(1, self_index[:, None], False)
        w = neg_weight["rows"][None, :] * neg
        ng = (w / w.sum(1, keepdim=True) * (z_all.shape[0] - 2) * logits.exp()).sum(1)
        return dcl_module.Debiased((torch.log(pos_logit.exp() + ng) - pos_logit).mean(), torch.zeros(()))
    dcl_module.debiased_contrastive_loss = weighted_negatives
class_weight = torch.from_numpy((counts.mean() / counts) ** a.oracle_negatives).float()[torch.from_numpy(Y)].to(dev)
method = to_device(build_method(cfg, info), cfg, dev)  # as training places it (NHWC; bf16 autocast on CUDA)
if a.max_pool:
    for module in list(method.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.AdaptiveAvgPool2d):
                setattr(module, name, torch.nn.AdaptiveMaxPool2d(1))
opt = make_optimizer(cfg, method)
B = cfg.data.batch_size
spe = N // B
g = torch.Generator().manual_seed(cfg.seed)

if a.time_steps:
    for s_ in range(a.time_steps + 1):
        if s_ == 1:
            t_ = time.time()
        idx = torch.randperm(N, generator=g)[:B].to(dev)
        train_step(method, method, opt, idx, *views.for_method(method, X[idx], s_, 0))
    print(json.dumps({"seconds_per_step": round((time.time() - t_) / a.time_steps, 3), "threads": a.threads,
                      "overrides": a.overrides}))
    sys.exit()

def map_train(fn):
    method.eval(); outs = []
    with torch.no_grad():
        for lo in range(0, N, 1024):
            idx = torch.arange(lo, min(N, lo + 1024), device=dev)
            outs.append(fn(views.eval(X[idx]), idx))
    method.train()
    return torch.cat(outs), torch.arange(N, device=dev)

saved = {}

def evaluate():
    method.eval(); fs, cs, bbs = [], [], []
    with torch.no_grad():
        for lo in range(0, N, 1024):
            x = views.eval(X[lo:lo + 1024])
            p = method.predict(x); fs.append(p.features.float().flatten(1).cpu()); cs.append(p.clusters[:, 0].cpu())
            bb = getattr(method, "backbone", None)
            if bb is not None: bbs.append(bb(x).float().flatten(1).cpu())
    method.train()
    saved.update(features=torch.cat(fs), labels=torch.from_numpy(Y), keep=torch.from_numpy(keep))
    if bbs: saved["backbone"] = torch.cat(bbs)
    out = ev(torch.cat(fs), Y, torch.cat(cs).numpy())
    if bbs:
        out["bb_km"] = ev(torch.cat(bbs), Y)["km"]
    return out

t0 = time.time(); step = 0; epoch = 0; hist = []
budget = a.minutes * 60
# epochs in config determine the schedule; stop at whichever comes first
while epoch < cfg.optim.epochs and time.time() - t0 < budget:
    method.on_epoch_start(EpochContext(epoch, cfg.optim.epochs, spe, map_train))
    perm = torch.randperm(N, generator=g)
    for s in range(spe):
        idx = perm[s * B:(s + 1) * B].to(dev)
        apply_lr(opt, lr_factor(cfg, step, spe))
        if a.remap > 0:
            def remap(xb, gen):
                n = len(xb)
                on = torch.rand(n, generator=gen) < a.remap
                perm = torch.argsort(torch.rand(n, 3, generator=gen), dim=1)
                inv = torch.rand(n, 3, generator=gen) < 0.5
                y = xb.gather(1, perm[:, :, None, None].expand(-1, -1, 32, 32))
                y = torch.where(inv[:, :, None, None], 255 - y, y)
                return torch.where(on[:, None, None, None], y, xb)
            gg = torch.Generator().manual_seed(step)
            x1 = views.train(remap(X[idx], gg), step, 0)[0]; x2 = views.train(remap(X[idx], gg), step + 10**6, 0)[1]
        else:
            x1, x2 = views.for_method(method, X[idx], step, 0)
        neg_weight["rows"] = class_weight[idx].repeat(2)  # [view 1; view 2], as z_all's rows in one process
        out = train_step(method, method, opt, idx, x1, x2)
        step += 1
        if step % a.eval_every == 0:
            te = time.time(); r = evaluate(); r.update(step=step, ep=epoch, t=round(te - t0), loss=round(float(out.loss), 3))
            print(json.dumps(r), flush=True); hist.append(r); t0 += time.time() - te
        if time.time() - t0 > budget: break
    epoch += 1
method.on_train_end() if hasattr(method, "on_train_end") else None
r = evaluate(); r.update(step=step, ep=epoch, t=round(time.time() - t0), final=True, tag=a.tag, ov=a.overrides)
print(json.dumps(r), flush=True)
if a.save:
    torch.save(saved, a.save)
