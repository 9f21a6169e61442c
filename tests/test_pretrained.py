"""Pretrained backbones (docs/pretrained.md): torchvision's and timm's models with random weights saved in each
library's own format, and a DINO-style checkpoint, loaded through model.weights from a path and from the loopback
S3 server, give the saved model's outputs; what does not fit is an error that lists it; a djc run dir is a source;
model.freeze fixes what it says and keeps it in inference mode."""

from __future__ import annotations

import argparse
import io
import json

import fsspec
import pytest
import torch
from torch import nn

from djc import checkpoint
from djc.models import freeze, weights, zoo
from djc.models.backbones import build_encoder
from djc.models.settings import ModelConfig


def _save(obj, url: str, safetensors: bool = False) -> str:
    if safetensors:
        from safetensors.torch import save

        data = save(obj)
    else:
        buf = io.BytesIO()
        torch.save(obj, buf)
        data = buf.getvalue()
    with fsspec.open(url, "wb") as f:
        f.write(data)
    return url


def _same(a: nn.Module, b: nn.Module, x: torch.Tensor, atol: float = 0.0) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0.0 if atol == 0 else 1e-5, atol=atol)


def test_torchvision_resnet_from_its_pth_equals_the_saved_model(tmp_path, bucket):
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None)
    for m in ref.modules():  # running statistics that are not the defaults, so loading them matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 32, 32)
    for base in (str(tmp_path), bucket):
        url = _save(ref.state_dict(), f"{base}/resnet18.pth")  # torchvision's own format, its classifier included
        bb = build_encoder(ModelConfig(backbone="torchvision:resnet18", weights=url), (32, 32, 3))
        assert bb.feat_dim == 512 and "left out 2 tensor(s) of a head" in bb.notes[0] and "fc.weight" in bb.notes[0]
        ref_features = nn.Sequential(*list(ref.children())[:-1], nn.Flatten())  # ResNet without its fc
        _same(bb.net, ref_features, x)




def _timm():
    return pytest.importorskip("timm", reason="timm is an optional extra (pip install -e '.[timm]')")


VIT = "vit_tiny_patch16_224"  # timm's smallest ViT (5.7M parameters), built at 32 px (2 x 2 patches) to be quick


def _vit(t):
    return t.create_model(VIT, pretrained=False, num_classes=0, img_size=32)


def test_timm_vit_from_its_safetensors_equals_the_saved_model(tmp_path, bucket):
    t = _timm()
    torch.manual_seed(1)
    ref = _vit(t)
    x = torch.randn(2, 3, 32, 32)
    for base in (str(tmp_path), bucket):
        url = _save(ref.state_dict(), f"{base}/vit_tiny.safetensors", safetensors=True)
        bb = build_encoder(ModelConfig(backbone=f"timm:{VIT}", weights=url), (32, 32, 3))
        _same(bb.net, ref, x)
        assert bb.feat_dim == 192 and bb.notes == ()


def _dino_checkpoint(teacher: dict, student: dict) -> dict:
    """The layout of DINO's main_dino.py checkpoint: MultiCropWrapper(backbone, DINOHead) per network, the student
    wrapped in DDP (module.), the optimiser, and the run's argparse Namespace."""
    head = {"head.mlp.0.weight": torch.randn(32, 192), "head.mlp.0.bias": torch.zeros(32),
            "head.last_layer.weight_g": torch.ones(64, 1), "head.last_layer.weight_v": torch.randn(64, 32)}
    return {"teacher": {**{f"backbone.{k}": v for k, v in teacher.items()}, **head},
            "student": {**{f"module.backbone.{k}": v for k, v in student.items()},
                        **{f"module.{k}": v for k, v in head.items()}},
            "optimizer": {"state": {}, "param_groups": []}, "epoch": 100, "dino_loss": {"center": torch.zeros(1, 64)},
            "args": argparse.Namespace(arch="vit_tiny", patch_size=16, lr=0.0005, global_crops_scale=(0.4, 1.0))}


def test_a_dino_checkpoint_gives_its_teacher_or_student_and_leaves_its_head_out(tmp_path, bucket):
    t = _timm()
    torch.manual_seed(2)
    teacher, student = _vit(t), _vit(t)
    ckpt = _dino_checkpoint(teacher.state_dict(), student.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for (key, ref), base in zip((("teacher", teacher), ("student", student)), (str(tmp_path), bucket)):
        url = _save(ckpt, f"{base}/checkpoint.pth")
        bb = build_encoder(ModelConfig(backbone=f"timm:{VIT}", weights=url, weights_key=key), (32, 32, 3))
        _same(bb.net, ref, x)
        assert "projection head (head.mlp.0.weight" in bb.notes[0]


def _to_dino_layout(tv: dict) -> dict:
    """torchvision's ViT keys in DINO's layout, written out here independently of djc's converter."""
    out = {"cls_token": tv["class_token"], "pos_embed": tv["encoder.pos_embedding"],
           "patch_embed.proj.weight": tv["conv_proj.weight"], "patch_embed.proj.bias": tv["conv_proj.bias"],
           "norm.weight": tv["encoder.ln.weight"], "norm.bias": tv["encoder.ln.bias"]}
    names = {"ln_1": "norm1", "self_attention.out_proj": "attn.proj", "ln_2": "norm2", "mlp.0": "mlp.fc1",
             "mlp.3": "mlp.fc2"}
    for k, v in tv.items():
        if not k.startswith("encoder.layers."):
            continue
        layer, rest = k.removeprefix("encoder.layers.encoder_layer_").split(".", 1)
        rest = {"self_attention.in_proj_weight": "attn.qkv.weight",
                "self_attention.in_proj_bias": "attn.qkv.bias"}.get(rest, rest)
        for a, b in names.items():
            if rest.startswith(a + "."):
                rest = b + rest[len(a):]
        out[f"blocks.{layer}.{rest}"] = v
    return out


def _tiny_tv_vit(side: int = 32, dim: int = 16, depth: int = 2) -> nn.Module:
    from torchvision.models import VisionTransformer

    net = VisionTransformer(image_size=side, patch_size=8, num_layers=depth, num_heads=2, hidden_dim=dim,
                            mlp_dim=2 * dim)
    net.heads = nn.Identity()
    return net


def test_dino_vit_layout_becomes_torchvision_vit_layout():
    torch.manual_seed(3)
    ref, fresh = _tiny_tv_vit(), _tiny_tv_vit()
    dino = {f"backbone.{k}": v for k, v in _to_dino_layout(ref.state_dict()).items()}
    state, notes = weights.unwrap({"teacher": dino, "args": argparse.Namespace(arch="vit_tiny")}, "teacher", "x")
    fit, _ = weights.match(fresh, weights.convert(state, fresh, "torchvision:vit_b_16"), "x", "torchvision:vit_b_16")
    fresh.load_state_dict(fit)
    _same(fresh, ref, torch.randn(2, 3, 32, 32))


def test_timm_vit_weights_in_a_torchvision_vit_give_the_same_features():
    """DINO's and timm's ViT compute what torchvision's does: the same weights, the same outputs."""
    t = _timm()
    from torchvision.models import VisionTransformer

    torch.manual_seed(4)
    ref = _vit(t)
    tv = VisionTransformer(image_size=32, patch_size=16, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768)
    tv.heads = nn.Identity()
    fit, _ = weights.match(tv, weights.vit_to_torchvision(ref.state_dict()), "x", "torchvision:vit_b_16")
    tv.load_state_dict(fit)
    _same(tv, ref, torch.randn(2, 3, 32, 32), atol=1e-5)


def test_what_does_not_fit_is_listed(tmp_path):
    import torchvision

    state = torchvision.models.resnet18(weights=None).state_dict()
    url = _save(state, f"{tmp_path}/resnet18.pth")
    with pytest.raises(weights.WeightsError, match=r"does not fit model.backbone=torchvision:resnet34: \d+ key\(s\) "
                                                   r"do not match: missing from the file \[layer1.2.conv1.weight"):
        build_encoder(ModelConfig(backbone="torchvision:resnet34", weights=url), (32, 32, 3))
    state["layer9.weight"] = state.pop("layer4.1.bn2.bias")
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    url = _save(state, f"{tmp_path}/renamed.pth")
    with pytest.raises(weights.WeightsError) as err:
        build_encoder(ModelConfig(backbone="torchvision:resnet18", weights=url), (32, 32, 3))
    msg = str(err.value)
    assert "\n" not in msg and "3 key(s) do not match" in msg
    assert "missing from the file [layer4.1.bn2.bias]" in msg and "not in the backbone [layer9.weight]" in msg
    assert "of another shape [conv1.weight (64, 3, 3, 3) vs (64, 3, 7, 7)]" in msg


def test_a_planted_pickle_is_refused_not_run(tmp_path):
    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    url = _save({"state_dict": {"w": torch.ones(1)}, "x": Boom()}, f"{tmp_path}/evil.pth")
    with pytest.raises(weights.WeightsError, match="refusing to load model.weights .*could run code"):
        build_encoder(ModelConfig(backbone="torchvision:resnet18", weights=url), (32, 32, 3))
    assert not (tmp_path / "pwned").exists()


def _run_dir(root: str, model: dict, method_state: dict) -> str:
    with fsspec.open(f"{root}/config.yaml", "w") as f:
        f.write(json.dumps({"model": model, "method": {"name": "statdec"}}))  # JSON is YAML
    with fsspec.open(f"{root}/{checkpoint.RAY_RECORD}", "w") as f:
        json.dump({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_000001", "metrics": {}}}, f)
    buf = io.BytesIO()
    torch.save({"method": method_state, "optimizer": {}, "stream": {}, "epoch": 1, "step": 8}, buf)
    with fsspec.open(f"{root}/train/checkpoint_000001/{checkpoint.CKPT_FILE}", "wb") as f:
        f.write(buf.getvalue())
    return root


def test_a_run_dir_gives_its_latest_checkpoints_encoder(tmp_path, bucket):
    torch.manual_seed(5)
    model = {"backbone": "smallconv", "width": 8}
    pretext = build_encoder(ModelConfig(**model), (8, 8, 1)).net
    head = {"proj.0.weight": torch.randn(4, 16)}
    for base in (str(tmp_path), bucket):
        url = _run_dir(f"{base}/runs/pretext", model,
                       {**{f"backbone.{k}": v for k, v in pretext.state_dict().items()}, **head})
        bb = build_encoder(ModelConfig(**model, weights=url, freeze="all"), (8, 8, 1))
        _same(bb.net, pretext, torch.randn(3, 1, 8, 8))
        assert bb.notes[0].endswith("train/checkpoint_000001/state.pt")
    with pytest.raises(weights.WeightsError, match="is a run of model.backbone=smallconv; this run's model.backbone "
                                                   "is mlp"):
        build_encoder(ModelConfig(backbone="mlp", width=8, weights=url), (8, 8, 1))


def test_weights_head_puts_the_run_dirs_projection_head_on_its_encoder(tmp_path):
    """model.weights_head: the features are the pretext run's normalised projection outputs, exactly; a run dir
    without a head, a head of the wrong width and an empty model.weights are clear errors."""
    from djc.models.backbones import projection_head

    torch.manual_seed(6)
    model = {"backbone": "smallconv", "width": 8}
    pretext = build_encoder(ModelConfig(**model), (8, 8, 1))
    proj = projection_head(pretext.feat_dim, 12, 5)
    proj.train()(torch.randn(32, pretext.feat_dim))  # running statistics that are not the initial ones
    state = {**{f"backbone.{k}": v for k, v in pretext.net.state_dict().items()},
             **{f"proj.{k}": v for k, v in proj.state_dict().items()}}
    url = _run_dir(str(tmp_path / "pretext"), model, state)
    bb = build_encoder(ModelConfig(**model, weights=url, weights_head=True, freeze="all"), (8, 8, 1))
    assert bb.feat_dim == 5 and freeze.is_frozen(bb.net)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        want = torch.nn.functional.normalize(proj.eval()(pretext.net.eval()(x)), dim=1)
    torch.testing.assert_close(bb.net.eval()(x), want, rtol=0.0, atol=0.0)
    assert "with its projection head (16 -> 12 -> 5, normalised)" in bb.notes[-1]

    bare = _run_dir(str(tmp_path / "bare"), model, {k: v for k, v in state.items() if k.startswith("backbone.")})
    with pytest.raises(weights.WeightsError, match="holds no projection head"):
        build_encoder(ModelConfig(**model, weights=bare, weights_head=True), (8, 8, 1))
    with pytest.raises(ValueError, match="model.weights is empty"):
        ModelConfig(**model, weights_head=True)
    with pytest.raises(ValueError, match="model.freeze is all or none"):
        ModelConfig(**model, weights=url, weights_head=True, freeze=1)
    # A run that clustered on the head is not itself a source: its backbone.* holds backbone and head.
    onhead = _run_dir(str(tmp_path / "onhead"), {**model, "weights": url, "weights_head": True}, state)
    with pytest.raises(weights.WeightsError, match="name that pretext run"):
        build_encoder(ModelConfig(**model, weights=onhead), (8, 8, 1))


def test_freeze_n_trains_only_the_last_blocks_and_holds_the_rest_in_eval():
    from djc.methods.base import ClusteringMethod

    net = zoo.build("torchvision:resnet18", 3, 32).net
    freeze.apply(net, 2, "torchvision:resnet18")
    trains = sorted({k.split(".")[0] + "." + k.split(".")[1] for k, p in net.named_parameters() if p.requires_grad})
    assert trains == ["layer4.0", "layer4.1"]  # ResNet-18's 8 residual blocks, the last 2
    method = ClusteringMethod()
    method.backbone = net
    method.train()
    assert net.layer4.training and not net.layer3.training and not net.bn1.training
    with pytest.raises(ValueError, match="model.freeze=9: model.backbone=torchvision:resnet18 has 8 blocks"):
        freeze.apply(zoo.build("torchvision:resnet18", 3, 32).net, 9, "torchvision:resnet18")


def test_a_frozen_backbone_is_fixed_in_training_and_runs_without_grad():
    from djc.methods.base import ClusteringMethod

    method = ClusteringMethod()
    method.backbone = build_encoder(ModelConfig(backbone="smallconv", width=8, freeze="all"), (8, 8, 3)).net
    before = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    method.train()
    x = torch.randn(4, 3, 8, 8)
    f = method.encode(x)
    assert not f.requires_grad and not method.backbone.training
    assert all(torch.equal(v, method.backbone.state_dict()[k]) for k, v in before.items())  # no BN update
    torch.testing.assert_close(method.encode(x[:2]), f[:2])  # an image's features do not depend on its batch


def test_inputs_come_from_the_weights_when_they_are_loaded():
    from djc.data.inputs import run_input

    data = ((0.3,) * 3, (0.2,) * 3, (32, 32, 3))
    assert run_input(ModelConfig(backbone="torchvision:resnet50"), 0, *data) == ((0.3,) * 3, (0.2,) * 3, 32)
    pretrained = run_input(ModelConfig(backbone="torchvision:resnet50", weights="w.pth"), 0, *data)
    assert pretrained == (zoo.IMAGENET_MEAN, zoo.IMAGENET_STD, 224)
    assert run_input(ModelConfig(backbone="torchvision:vit_b_16"), 0, *data).size == 224  # a ViT's grid, always
    assert run_input(ModelConfig(backbone="smallconv", weights="w.pth"), 0, *data) == ((0.3,) * 3, (0.2,) * 3, 32)
