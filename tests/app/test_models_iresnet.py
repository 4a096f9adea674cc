"""IResNet: insightface key layout, checkpoint loading (file, 'module.' prefix, bad keys), student split."""
import pytest
import torch

from gdrd_fast.models import (IResNet, build_student, get_model, load_backbone, split_student)

ARCH_LAYERS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3)}


def insightface_layout(layers, num_features=512):
    """Key -> shape of insightface arcface_torch backbones/iresnet.py, written out independently."""
    keys = {}

    def bn(prefix, c):
        keys.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                     f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()})

    keys["conv1.weight"] = (64, 3, 3, 3)
    bn("bn1", 64)
    keys["prelu.weight"] = (64,)
    cin = 64
    for i, (n, w) in enumerate(zip(layers, (64, 128, 256, 512))):
        for j in range(n):
            p, c = f"layer{i + 1}.{j}", (cin if j == 0 else w)
            bn(f"{p}.bn1", c)
            keys[f"{p}.conv1.weight"] = (w, c, 3, 3)
            bn(f"{p}.bn2", w)
            keys[f"{p}.prelu.weight"] = (w,)
            keys[f"{p}.conv2.weight"] = (w, w, 3, 3)
            bn(f"{p}.bn3", w)
            if j == 0:  # every stage starts with a stride-2 block
                keys[f"{p}.downsample.0.weight"] = (w, c, 1, 1)
                bn(f"{p}.downsample.1", w)
        cin = w
    bn("bn2", 512)
    keys["fc.weight"], keys["fc.bias"] = (num_features, 512 * 7 * 7), (num_features,)
    bn("features", num_features)
    return keys


def random_checkpoint(layout):
    """Values a trained network could have: positive running variances, PReLU slopes around 0.25."""
    state = {}
    for k, shape in layout.items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(1000)
        elif k.endswith("running_var"):
            state[k] = torch.rand(shape) + 0.5
        else:
            state[k] = torch.randn(shape) * 0.05
    return state


@pytest.mark.parametrize("arch", sorted(ARCH_LAYERS))
def test_state_dict_layout_matches_insightface(arch):
    with torch.device("meta"):
        net = get_model(arch)
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got == insightface_layout(ARCH_LAYERS[arch])


def test_insightface_checkpoint_round_trip_into_net_and_split(tmp_path):
    state = random_checkpoint(insightface_layout(ARCH_LAYERS["r18"]))
    path = tmp_path / "backbone.pth"
    torch.save({"module." + k: v for k, v in state.items()}, path)  # as saved from a DDP-wrapped model

    net = load_backbone(path, "r18").eval()
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        expected = net(x)
        backbone, head = split_student(net)
        feature = backbone(x)
        assert feature.shape == (3, 256, 14, 14)
        torch.testing.assert_close(head(feature), expected, rtol=0, atol=0)

        # a fresh split loads the same file half by half
        fresh_backbone, fresh_head = split_student(get_model("r18"))
        load_backbone(path, fresh_backbone)
        load_backbone(state, fresh_head)
        fresh_backbone.eval(), fresh_head.eval()
        torch.testing.assert_close(fresh_head(fresh_backbone(x)), expected, rtol=0, atol=0)
    assert expected.shape == (3, 512) and torch.isfinite(expected).all()


def test_split_shares_parameters_with_the_net():
    student = build_student("r18")
    net_params = {id(p) for p in student.net.parameters()}
    backbone_params = {id(p) for p in student.backbone.parameters()}
    head_params = {id(p) for p in student.head.parameters()}
    assert backbone_params | head_params == net_params and not backbone_params & head_params
    assert set(student.backbone.state_dict()) | set(student.head.state_dict()) == set(student.net.state_dict())


def test_bad_checkpoints_name_the_keys_and_change_nothing(tmp_path):
    net = get_model("r18")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    good = random_checkpoint(insightface_layout(ARCH_LAYERS["r18"]))

    missing = dict(good)
    del missing["layer2.1.conv2.weight"]
    with pytest.raises(ValueError, match=r"missing keys: layer2\.1\.conv2\.weight"):
        load_backbone(missing, net)
    extra = dict(good, **{"head.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unexpected keys: head\.weight"):
        load_backbone(extra, net)
    with pytest.raises(ValueError, match=r"shape mismatches: .*fc\.weight: file \(128, 25088\) vs model \(512, 25088\)"):
        load_backbone(random_checkpoint(insightface_layout(ARCH_LAYERS["r18"], num_features=128)), net)
    with pytest.raises(ValueError, match=r"unexpected keys: layer1\.2\."):  # an r50 file into an r18
        load_backbone(random_checkpoint(insightface_layout(ARCH_LAYERS["r50"])), "r18")
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k

    with pytest.raises(FileNotFoundError, match="no file"):
        load_backbone(tmp_path / "absent.pth", "r18")
    with pytest.raises(ValueError, match="name must be one of"):
        get_model("r77")
    with pytest.raises(TypeError, match="net must be an IResNet"):
        split_student(torch.nn.Linear(2, 2))


def test_fp16_flag_runs_the_trunk_under_autocast_and_returns_fp32():
    net = get_model("r18", fp16=True).eval()
    reference = get_model("r18").eval()
    reference.load_state_dict(net.state_dict())
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        out, expected = net(x), reference(x)
    assert out.dtype == torch.float32 and isinstance(net, IResNet)
    # bfloat16 autocast on CPU: close to fp32, not equal
    assert (out - expected).abs().max() < 0.05 * expected.abs().max()
    assert not torch.equal(out, expected)
