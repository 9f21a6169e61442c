"""The RGB benchmark's supervised ceiling: the job's backbone and view 1, cross-entropy on the labels of the
long-tailed train split, accuracy on the balanced test split every 100 steps: what the encoder can learn in the
time when it is told the classes. usage: python benchmarks/shapes_supervised.py JOB THREADS MINUTES [key=value ...]"""
import sys, time, json, torch, numpy as np, torch.nn as nn
from djc.config import load_config
from djc.data import shapes
from djc.data.augment import ViewPair
from djc.models.backbones import build_backbone
torch.set_num_threads(int(sys.argv[2])); cfg = load_config(sys.argv[1], sys.argv[4:]); minutes = float(sys.argv[3])
X0, Y0 = shapes.longtail(10); X = torch.from_numpy(X0).permute(0, 3, 1, 2).contiguous(); Y = torch.from_numpy(Y0)
XT0, YT = shapes.generate("test", seed=0); XT = torch.from_numpy(XT0).permute(0, 3, 1, 2).contiguous()
x32 = X.float().div(255); views = ViewPair(cfg, x32.mean(dim=(0, 2, 3)).tolist(), x32.std(dim=(0, 2, 3)).tolist(), 32)
torch.manual_seed(0); bb = build_backbone(cfg.model.backbone, (32, 32, 3), cfg.model.width)
net = nn.Sequential(bb.net, nn.Linear(bb.feat_dim, 10)); opt = torch.optim.Adam(net.parameters(), 2e-3)
t0 = time.time(); step = 0
while time.time() - t0 < minutes * 60:
    idx = torch.randint(0, len(X), (256,)); x1, _ = views.train(X[idx], step, 0)
    loss = nn.functional.cross_entropy(net(x1), Y[idx]); opt.zero_grad(); loss.backward(); opt.step(); step += 1
    if step % 100 == 0:
        net.eval()
        with torch.no_grad(): p = torch.cat([net(views.eval(XT[i:i+1000])).argmax(1) for i in range(0, 2000, 1000)])
        net.train(); print(json.dumps({"step": step, "t": round(time.time() - t0), "test_acc": round(float((p == torch.from_numpy(YT)).float().mean()), 3)}), flush=True)
