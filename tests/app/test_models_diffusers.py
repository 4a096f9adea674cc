"""diffusers UNet2DModel teacher: tap shapes, equality with the full UNet, local folder / state-dict loading,
and that nothing imports diffusers until a diffusers teacher is built."""
import importlib.util
import subprocess
import sys

import pytest
import torch

from gdrd_fast.models import DiffusionEncoder, build_generative_teacher, build_unet, diffusion_encoder

requires_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                                        reason="diffusers is not installed (optional)")

# tiny config at 56x56: blocks 0 and 1 halve the size, block 2 (the last) does not
TINY_TAPS = {"conv_in": (16, 56, 56), "down_blocks.0": (16, 28, 28), "down_blocks.1.resnets.0": (32, 28, 28),
             "down_blocks.2": (64, 14, 14), "down_blocks.2.attentions.0": (64, 14, 14), "mid_block": (64, 14, 14)}


def feature_of_full_unet(unet, name, x, t):
    """What the complete UNet2DModel.forward computes at module `name`, caught with a hook."""
    caught = []
    handle = dict(unet.named_modules())[name].register_forward_hook(lambda m, i, out: caught.append(out))
    with torch.no_grad():
        unet(x, t)
    handle.remove()
    out = caught[0]
    return out[0] if isinstance(out, tuple) else out  # down blocks return (hidden, residuals)


@pytest.fixture(scope="module")
def tiny_unet():
    return build_unet("tiny").eval()


@requires_diffusers
@pytest.mark.parametrize("tap", sorted(TINY_TAPS))
def test_tap_shape_and_value_match_the_full_unet(tiny_unet, tap):
    encoder = DiffusionEncoder(tiny_unet, tap)
    x, t = torch.randn(2, 3, 56, 56), torch.tensor([0, 617])
    with torch.no_grad():
        out = encoder(x, t)
    assert out.shape == (2, *TINY_TAPS[tap])
    assert encoder.out_channels == out.shape[1] and encoder.stride == 56 // out.shape[-1]
    torch.testing.assert_close(out, feature_of_full_unet(tiny_unet, tap, x, t), rtol=0, atol=0)


@requires_diffusers
def test_encoder_keeps_only_what_the_tap_needs(tiny_unet):
    keys = set(DiffusionEncoder(tiny_unet, "down_blocks.1").state_dict())
    assert keys and keys < set(tiny_unet.state_dict())
    assert not any(k.startswith(("down_blocks.2.", "mid_block.", "up_blocks.", "conv_out.")) for k in keys)


@requires_diffusers
def test_weights_from_a_local_folder_and_from_a_state_dict(tmp_path):
    unet = build_unet("tiny").eval()
    with torch.no_grad():
        for p in unet.parameters():  # not the fresh init, so loading is visible
            p.add_(torch.randn_like(p) * 0.01)
    unet.save_pretrained(tmp_path / "teacher")
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        expected = DiffusionEncoder(unet, "down_blocks.2")(x)
        from_folder = build_generative_teacher("diffusers", "tiny", weights=tmp_path / "teacher").eval()
        torch.testing.assert_close(from_folder(x), expected, rtol=0, atol=0)

        path = tmp_path / "unet.pt"
        torch.save({"module." + k: v for k, v in unet.state_dict().items()}, path)
        from_file = diffusion_encoder("tiny", weights=path).eval()
        torch.testing.assert_close(from_file(x), expected, rtol=0, atol=0)

    state = dict(unet.state_dict(), **{"down_blocks.0.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys: down_blocks\.0\.extra\.weight"):
        diffusion_encoder("tiny", weights=state)
    state = {k: v for k, v in unet.state_dict().items() if k != "conv_in.weight"}
    with pytest.raises(ValueError, match=r"missing keys: conv_in\.weight"):
        diffusion_encoder("tiny", weights=state)
    with pytest.raises(FileNotFoundError):
        diffusion_encoder("tiny", weights=tmp_path / "nothing.pt")


@requires_diffusers
@pytest.mark.parametrize("tap", ["down_blocks.2.attentions.0", "down_blocks.1.resnets.0"])
def test_full_unet_state_dict_loads_for_a_tap_inside_a_block(tmp_path, tap):
    """The tapped module is registered once: a full UNet's weights load and no key is duplicated."""
    unet = build_unet("tiny").eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    encoder = diffusion_encoder("tiny", weights=unet.state_dict(), tap=tap).eval()
    keys = list(encoder.state_dict())
    assert keys and set(keys) <= set(unet.state_dict()), "the encoder has keys the UNet lacks"
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x, 5), feature_of_full_unet(unet, tap, x, 5), rtol=0, atol=0)
    torch.save(encoder.state_dict(), tmp_path / "encoder.pt")  # a saved encoder reloads strictly
    diffusion_encoder("tiny", weights=tmp_path / "encoder.pt", tap=tap)


@requires_diffusers
def test_python_float_timestep_is_cast_to_long_as_diffusers_does(tiny_unet):
    encoder = DiffusionEncoder(tiny_unet, "down_blocks.1")
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        out = encoder(x, 617.9)
        torch.testing.assert_close(out, feature_of_full_unet(tiny_unet, "down_blocks.1", x, 617.9), rtol=0, atol=0)
        torch.testing.assert_close(out, encoder(x, 617), rtol=0, atol=0)
        assert not torch.equal(out, encoder(x, torch.tensor(617.9)))  # a tensor keeps its fraction, as in diffusers
    with pytest.raises(ValueError, match="timestep must hold 1 or 2"):
        encoder(x, torch.tensor([1, 2, 3]))


@requires_diffusers
def test_bad_taps_and_configs(tiny_unet):
    with pytest.raises(ValueError, match="tap must be"):
        DiffusionEncoder(tiny_unet, "up_blocks.0")
    with pytest.raises(ValueError, match="is not a module of this UNet"):
        DiffusionEncoder(tiny_unet, "down_blocks.7")
    with pytest.raises(ValueError, match="config must be one of"):
        build_unet("huge")
    with pytest.raises(ValueError, match="kind must be one of"):
        build_generative_teacher("gan")


def test_missing_diffusers_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` fail
    with pytest.raises(ImportError, match="optional package 'diffusers'"):
        build_unet("tiny")


def test_package_imports_without_touching_diffusers():
    code = "import sys, gdrd_fast, gdrd_fast.models; assert 'diffusers' not in sys.modules, 'diffusers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
@requires_diffusers
def test_pgdiff_like_config_taps_512x14x14_at_448():
    teacher = build_generative_teacher("diffusers", "pgdiff-like").eval()
    with torch.no_grad():
        out = teacher(torch.rand(1, 3, 448, 448) * 2 - 1)
    assert out.shape == (1, 512, 14, 14) and (teacher.out_channels, teacher.stride) == (512, 32)


@requires_diffusers
def test_teachers_declare_input_size_tap_and_feature_shape(tiny_unet):
    from gdrd_fast.models import GuidedDiffusionEncoder, UNetConfig
    encoder = DiffusionEncoder(tiny_unet, "down_blocks.1", input_size=40)
    with torch.no_grad():
        assert encoder(torch.randn(1, 3, 40, 40)).shape[1:] == encoder.feature_shape == (32, 10, 10)
    assert DiffusionEncoder(tiny_unet, "down_blocks.2").input_size == 32  # the UNet's sample_size by default
    small = UNetConfig(image_size=64, model_channels=32, channel_mult=(1, 2), num_res_blocks=(1, 1),
                       attention_resolutions=(32,), num_head_channels=32)
    pgdiff = GuidedDiffusionEncoder(small, "input_blocks.3", input_size=24)
    with torch.no_grad():
        assert pgdiff(torch.randn(1, 3, 24, 24)).shape[1:] == pgdiff.feature_shape == (64, 12, 12)
    assert GuidedDiffusionEncoder(small, "input_blocks.1").input_size == 448  # the paper's [choice]


@pytest.fixture(scope="module")
def tiny_vae():
    from gdrd_fast.models import build_vae
    vae = build_vae("tiny").eval()
    with torch.no_grad():
        for p in vae.parameters():  # not the fresh init (zero-initialised layers would hide mistakes)
            p.add_(torch.randn_like(p) * 0.02)
    return vae


@requires_diffusers
def test_vae_encoder_taps_match_the_autoencoder(tiny_vae):
    from gdrd_fast.models import VAEEncoder
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latent = VAEEncoder(tiny_vae, "latent")
        torch.testing.assert_close(latent(x), tiny_vae.encode(x).latent_dist.mean, rtol=0, atol=0)
        assert latent.feature_shape == (4, 8, 8) and latent(x).shape[1:] == (4, 8, 8)
        expected = {"conv_in": (16, 32, 32), "down_blocks.0": (16, 16, 16), "down_blocks.2": (64, 8, 8),
                    "mid_block": (64, 8, 8)}
        for tap, shape in expected.items():
            encoder = VAEEncoder(tiny_vae, tap)
            assert encoder(x).shape[1:] == encoder.feature_shape == shape, tap
        caught = []  # what the full encoder computes at down_blocks.1
        handle = tiny_vae.encoder.down_blocks[1].register_forward_hook(lambda m, i, out: caught.append(out))
        tiny_vae.encode(x)
        handle.remove()
        torch.testing.assert_close(VAEEncoder(tiny_vae, "down_blocks.1")(x), caught[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="no timestep"):
        latent(x, 10)
    with pytest.raises(ValueError, match="tap must be"):
        VAEEncoder(tiny_vae, "down_blocks.3")


@requires_diffusers
def test_vae_teacher_loads_a_full_autoencoder_from_a_state_dict_or_folder(tiny_vae, tmp_path):
    from gdrd_fast.models import vae_encoder
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = tiny_vae.encode(x).latent_dist.mean
        from_state = build_generative_teacher("vae", "tiny", weights={"module." + k: v for k, v in
                                                                     tiny_vae.state_dict().items()}).eval()
        torch.testing.assert_close(from_state(x), expected, rtol=0, atol=0)
        tiny_vae.save_pretrained(tmp_path / "vae")
        torch.testing.assert_close(vae_encoder(weights=tmp_path / "vae")(x), expected, rtol=0, atol=0)
    state = {k: v for k, v in tiny_vae.state_dict().items() if k != "quant_conv.weight"}
    with pytest.raises(ValueError, match=r"missing keys: quant_conv\.weight"):
        vae_encoder("tiny", weights=state)
    vae_encoder("tiny", weights=state, tap="mid_block")  # quant_conv is not used there
